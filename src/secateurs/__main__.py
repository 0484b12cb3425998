"""``python -m secateurs``: the same command as the ``secateurs`` script (torchrun needs this form)."""

import os
import signal


def _interrupted(signum: int, frame: object) -> None:  # until the CLI installs its own handler
    os.write(2, b"secateurs: interrupted\n")
    os._exit(130)


signal.signal(signal.SIGINT, _interrupted)

from secateurs.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
