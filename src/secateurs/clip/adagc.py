"""AdaGC: per-tensor clipping against an EMA of each tensor's own clipped norms.

Wang et al. 2025, "AdaGC: Improving Training Stability for Large Language Model Pretraining";
the recurrence is that of the authors' released code (``AdaGC.clip_by_norm`` in the Megatron
patch of github.com/lishuai-97/AdaGC), with ``n_i`` the 2-norm of gradient tensor i, ``||g||``
the total norm and ``gamma_i`` the tensor's threshold state:

* warm-up (the first ``warmup_steps`` steps): global clipping,
  ``h = min(lambda_abs / (||g|| + 1e-6), 1)`` for every tensor, and
  ``gamma_i <- min(gamma_i, h n_i)`` (``gamma`` starts at +inf, so step 1 sets it);
* afterwards the bound is ``b_i = lambda_rel gamma_i``: a tensor with ``n_i > b_i`` is scaled
  by ``b_i / (n_i + 1e-6)``, and ``gamma_i <- beta gamma_i + (1 - beta) min(n_i, b_i)``; a
  tensor first seen after the warm-up starts from ``gamma_i = n_i``.

Defaults are the paper's (``lambda_abs=1.0``, ``lambda_rel=1.05``, ``beta=0.98``, 100 warm-up
steps); the authors' training scripts pass ``clip_ratio=1.04``, ``clip_beta=0.99``
(``AdaGC(lambda_rel=1.04, beta=0.99)`` here). ``gamma`` is indexed by position in the
parameter list, so call the rule with the same parameters each step (as
:func:`~secateurs.clip.wrap` does); parameters without a gradient keep their state.

Where this differs from the authors' code, on purpose (``tests/test_clip_reference.py``
asserts each): a step whose total norm is not finite leaves every ``gamma`` unchanged and does
not count towards the warm-up (there, a NaN norm makes that tensor's ``gamma`` NaN for good,
after which it is never clipped again); the gradients of that step are still scaled (a NaN
stays NaN) for the non-finite policy of :func:`~secateurs.clip.wrap` to skip. ``gamma`` is
float32, kept on the gradients' device.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from secateurs.clip._tensors import check_positive, per_tensor_norms, scale_each_, upload
from secateurs.clip.registry import register
from secateurs.clip.rules import StatefulRule
from secateurs.clip.stats import ClipStats
from secateurs.errors import check

__all__ = ["AdaGC"]


@register("adagc")
class AdaGC(StatefulRule):
    """Adaptive per-tensor thresholds (EMA of clipped norms) after a global-clipping warm-up.

    The stats' ``threshold`` is the 2-norm of the per-tensor thresholds (``lambda_abs`` during
    warm-up).
    """

    def __init__(
        self,
        *,
        lambda_abs: float = 1.0,
        lambda_rel: float = 1.05,
        beta: float = 0.98,
        warmup_steps: int = 100,
    ) -> None:
        super().__init__()
        self.lambda_abs = check_positive(lambda_abs, "lambda_abs")
        self.lambda_rel = check_positive(lambda_rel, "lambda_rel")
        ok = isinstance(beta, (int, float)) and not isinstance(beta, bool) and 0 <= beta < 1
        check(ok, "beta", beta, "a number in [0, 1)")
        self.beta = float(beta)
        ok = isinstance(warmup_steps, int) and not isinstance(warmup_steps, bool)
        check(ok and warmup_steps >= 1, "warmup_steps", warmup_steps, "an integer >= 1")
        self.warmup_steps = warmup_steps
        self._size = 0
        self._active: tuple[tuple[tuple[int, ...], torch.device], Tensor] | None = None

    def _fresh_state(self, device: torch.device) -> dict[str, Tensor]:
        return {
            "gamma": torch.full((self._size,), torch.inf, device=device),
            "step": torch.zeros((), dtype=torch.long, device=device),
        }

    def _check_loaded(self, key: str, value: Tensor, like: Tensor) -> None:
        if key == "gamma":  # the size is only known once the rule sees the parameters
            check(value.dim() == 1, "adagc.state_dict['gamma']", tuple(value.shape), "a vector")
        else:
            super()._check_loaded(key, value, like)

    def _index(self, active: list[int], device: torch.device) -> Tensor:
        """``active`` on ``device``, uploaded once per set of parameters with gradients."""
        key = (tuple(active), device)
        if self._active is None or self._active[0] != key:
            self._active = key, upload(active, torch.long, device)
        return self._active[1]

    def clip(self, params: list[Tensor]) -> ClipStats:
        active = [i for i, p in enumerate(params) if p.grad is not None]
        grads = [params[i].grad for i in active]
        norms = per_tensor_norms(grads).float()  # type: ignore[arg-type]
        device = norms.device
        if self._state and self._state["gamma"].numel() != len(params):
            check(
                False,
                "adagc parameters",
                len(params),
                f"the same {self._state['gamma'].numel()} parameters on every step",
            )
        self._size = len(params)
        st = self._state_on(device)
        gamma_all, step = st["gamma"], st["step"]
        every = len(active) == len(params)
        index = None if every else self._index(active, device)
        gamma = gamma_all if index is None else gamma_all.index_select(0, index)

        total = torch.linalg.vector_norm(norms)
        finite = torch.isfinite(total)
        warming = step < self.warmup_steps
        h_global = torch.clamp(self.lambda_abs / (total + 1e-6), max=1.0)
        bound = self.lambda_rel * gamma
        # a tensor over its bound is scaled to it; the others keep a factor of exactly 1
        h_local = torch.where(norms > bound, bound / (norms + 1e-6), 1.0)
        h = torch.where(warming, h_global.expand_as(norms), h_local)
        scale_each_(grads, list(h.unbind()))  # type: ignore[arg-type]

        clipped_norms = h * norms
        # after the warm-up the EMA takes the bound itself for a clipped tensor (as the
        # authors' code does), and a tensor never seen before starts at its own norm
        ema = self.beta * gamma + (1 - self.beta) * torch.minimum(norms, bound)
        new_gamma = torch.where(
            warming,
            torch.minimum(gamma, clipped_norms),
            torch.where(gamma.isinf(), norms, ema),
        )
        new_gamma = torch.where(finite, new_gamma, gamma)
        if index is None:
            gamma_all.copy_(new_gamma)
        else:
            gamma_all.index_copy_(0, index, new_gamma)
        step.copy_(step + finite.long())

        threshold = torch.where(
            warming, torch.full_like(total, self.lambda_abs), torch.linalg.vector_norm(bound)
        )
        return ClipStats(
            norm_before=total,
            norm_after=torch.linalg.vector_norm(clipped_norms),
            threshold=threshold,
            clipped=(h < 1.0).any(),
        )

    def _fields(self) -> dict[str, Any]:
        return {
            "lambda_abs": self.lambda_abs,
            "lambda_rel": self.lambda_rel,
            "beta": self.beta,
            "warmup_steps": self.warmup_steps,
        }
