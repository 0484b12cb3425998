"""A stateful rule's scalar bookkeeping as one CUDA graph.

AutoClip and ZClip need the global norm that :class:`~secateurs.clip.GlobalNorm` computes plus
a threshold update: a ring buffer write, a sort and a percentile, or an EMA with a z-score
test. That update is twenty-odd kernels on a handful of scalars. On a GPU each costs a kernel
launch (a few microseconds of host time) and almost no device time, so run eagerly the update
would take longer than the norm of 24M gradient elements. Its inputs (the norm, a 0-d tensor)
and its state (the rule's tensors) keep their shapes and addresses from step to step, which
is what a CUDA graph needs: :class:`GraphedUpdate` captures the update once and replays it as
one launch.

The first call for a given state runs eagerly (it is the warm-up CUDA graphs want); the second
captures, then every call copies the norm into the graph's input, replays, and clones the
outputs (one clone per output dtype), so stats returned on earlier steps are never overwritten.
State that is replaced (``load_state_dict``, a move to another device) and a setting that
changes (``rule.percentile = 50``: the graph holds settings as constants) are captured afresh.
Anywhere else (CPU, ``meta``, DTensor norms, inside another graph capture or a
``torch.compile`` trace) the update simply runs eagerly. Capture never synchronises the host; if
it fails, the graph's memory pool is handed back, and the rule warns once and stays eager.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Hashable, Mapping

import torch
from torch import Tensor

__all__ = ["GraphedUpdate"]

Update = Callable[[Tensor, Mapping[str, Tensor]], tuple[Tensor, ...]]
Config = Callable[[], Hashable]


class GraphedUpdate:
    """Call ``update(x, state)``, on CUDA as a replayed graph; see the module docstring.

    ``update`` must write ``state`` in place, return 0-d tensors, never read a device value on
    the host, and depend on nothing but ``x``, ``state`` and the settings ``config()`` returns
    (a graph bakes settings in as constants, so one that changes is captured afresh).
    """

    def __init__(self, update: Update, name: str, config: Config) -> None:
        self.update = update
        self.name = name
        self.config = config
        self.enabled = True
        """False after a capture failed: eager from then on."""
        self.replays = 0
        """How many calls replayed a graph (for tests and benchmarks)."""
        self._key: tuple[object, ...] | None = None
        self._refs: tuple[Tensor, ...] = ()  # keeps the keyed state alive, so ids stay unique
        self._graph: torch.cuda.CUDAGraph | None = None
        self._input: Tensor | None = None
        self._packs: list[Tensor] = []
        self._where: list[tuple[int, int]] = []

    def __call__(self, x: Tensor, state: Mapping[str, Tensor]) -> tuple[Tensor, ...]:
        if not self._graphable(x, state):
            return self.update(x, state)
        key = (
            x.device,
            x.dtype,
            tuple(x.shape),
            tuple(map(id, state.values())),
            tuple(t.data_ptr() for t in state.values()),
            self.config(),
        )
        if key != self._key:  # new state or settings: run eagerly once, capture on the next call
            self._release()
            self._key, self._refs = key, tuple(state.values())
            outputs = self.update(x, state)
            _pack(outputs)  # loads the stacking kernels too, so capture loads none
            return outputs
        if self._graph is None and not self._capture(x, state):
            return self.update(x, state)
        assert self._input is not None
        self._input.copy_(x)
        assert self._graph is not None
        self._graph.replay()
        self.replays += 1
        copies = [p.clone() for p in self._packs]
        return tuple(copies[pack][i] for pack, i in self._where)

    def _graphable(self, x: Tensor, state: Mapping[str, Tensor]) -> bool:
        return (
            self.enabled
            and x.device.type == "cuda"
            and type(x) is Tensor
            and all(t.device == x.device and type(t) is Tensor for t in state.values())
            and not torch.compiler.is_compiling()
            and not torch.cuda.is_current_stream_capturing()
        )

    def _capture(self, x: Tensor, state: Mapping[str, Tensor]) -> bool:
        """Capture the update on a side stream; False (and eager from now on) if that fails."""
        graph = torch.cuda.CUDAGraph()
        current = torch.cuda.current_stream(x.device)
        side = torch.cuda.Stream(x.device)
        with torch.inference_mode(False):  # the input is allocated on the stream that fills it
            static = torch.empty_like(x)
        side.wait_stream(current)
        pool = torch.cuda.graph_pool_handle()
        try:
            with torch.inference_mode(False), torch.cuda.device(x.device), torch.cuda.stream(side):
                graph.capture_begin(pool=pool, capture_error_mode="thread_local")
                try:
                    outputs = self.update(static, state)
                    packs, where = _pack(outputs)
                finally:
                    graph.capture_end()
        except Exception as exc:
            _abandon(x.device, pool)
            warnings.warn(
                f"{self.name}: capturing its update as a CUDA graph failed ({exc}); "
                "running it eagerly from now on",
                RuntimeWarning,
                stacklevel=4,
            )
            self.enabled = False
            self._release()
            return False
        current.wait_stream(side)
        self._graph, self._input, self._packs, self._where = graph, static, packs, where
        return True

    def __getstate__(self) -> dict[str, object]:
        """Copies (``copy.deepcopy``, pickle) start without a graph: they capture their own."""
        state = self.__dict__.copy()
        state.update(_key=None, _refs=(), _graph=None, _input=None, _packs=[], _where=[])
        return state

    def _release(self) -> None:
        self._key, self._refs = None, ()
        self._graph, self._input, self._packs, self._where = None, None, [], []


def _abandon(device: torch.device, pool: object) -> None:
    """After a failed capture: stop routing allocations to the graph's pool and release it.

    ``capture_end`` raises before it does either when the capture was invalidated, which would
    leave the caching allocator believing a capture is still under way (it then defers every
    stream-recorded free for good). If ``capture_end`` got that far, the graph releases the
    pool itself and there is nothing to do.
    """
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        torch._C._cuda_endAllocateToPool(index, pool)  # type: ignore[attr-defined]
    except Exception:
        return
    with contextlib.suppress(Exception):
        torch._C._cuda_releasePool(index, pool)  # type: ignore[attr-defined]


def _pack(outputs: tuple[Tensor, ...]) -> tuple[list[Tensor], list[tuple[int, int]]]:
    """Stack 0-d outputs by dtype: one tensor per dtype to clone after each replay, and where
    each output is in them (pack, index)."""
    order: dict[torch.dtype, list[Tensor]] = {}
    where = []
    for t in outputs:
        group = order.setdefault(t.dtype, [])
        where.append((list(order).index(t.dtype), len(group)))
        group.append(t)
    return [torch.stack(group) for group in order.values()], where
