"""wrap(): an optimizer that clips before every step, logs what it did and guards against NaN.

>>> import torch
>>> from secateurs.clip import GlobalNorm, wrap
>>> model = torch.nn.Linear(4, 1)
>>> opt = wrap(torch.optim.SGD(model.parameters(), lr=0.1), GlobalNorm(1.0))
>>> model(torch.randn(8, 4)).pow(2).mean().backward()
>>> opt.step(); opt.zero_grad()
>>> opt.log.total_steps
1

Where the clipping goes, and why it is correct there:

* **Once per optimizer step.** With gradient accumulation, call ``backward()`` on each
  micro-batch and ``step()`` once: the rule sees the accumulated gradient, which is what the
  update uses. (Clipping each micro-batch would bound the pieces, not the sum.)
* **After unscaling.** With ``torch.amp.GradScaler`` call ``scaler.step(opt)`` on the *wrapped*
  optimizer. The scaler unscales the gradients (unless ``scaler.unscale_(opt)`` was called on
  this same wrapped object earlier in the iteration), skips the step itself when it finds
  inf/NaN, and otherwise calls ``opt.step()``, which clips the unscaled gradients. Do not mix
  the wrapped and the inner optimizer in scaler calls: the scaler tracks them separately and
  would unscale twice. Steps the scaler skips never reach the wrapper, so they are not in its
  log; the scaler records them by lowering its scale.
* **After pre-clip hooks, before step hooks.** Work that must change the gradients before the
  rule sees them, such as zeroing the gradients of pruned weights so they do not count in the
  norm, goes in a hook registered with :meth:`ClippedOptimizer.register_pre_clip_hook`
  (``secateurs.prune.Pruner.attach(wrapped)`` registers one). Hooks registered with
  ``register_step_pre_hook`` belong to the inner optimizer and run after the clipping.
* **Learning-rate schedulers** take the wrapped optimizer (it is a ``torch.optim.Optimizer``
  sharing the inner optimizer's ``param_groups``).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.optim.optimizer as torch_optimizer
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from secateurs.clip._tensors import total_norm
from secateurs.clip.guard import StepGuard
from secateurs.clip.log import ClipLog
from secateurs.clip.rules import Rule
from secateurs.clip.stats import ClipStats
from secateurs.errors import check

__all__ = ["NONFINITE", "ClippedOptimizer", "NonFiniteGradError", "wrap"]

NONFINITE = ("skip", "error", "ignore")
"""Policies for a step whose gradient norm is NaN or inf."""

NONFINITE_MESSAGE = (
    "gradient norm is non-finite; nonfinite='error' stops training here, "
    "nonfinite='skip' would skip the step"
)

# torch wraps every optimizer's step twice: hooks and profiling (Optimizer.profile_hook_step),
# then grad mode (_use_grad_for_differentiable), which calls torch._dynamo.graph_break() on
# purpose. Their code objects tell the wrappers apart from whatever else decorates a step.
_HOOKED = torch.optim.Optimizer.profile_hook_step(lambda *a, **k: None).__code__
_USE_GRAD = torch_optimizer._use_grad_for_differentiable(lambda *a, **k: None).__code__


_TRACED_LOGS: weakref.WeakValueDictionary[int, ClipLog] = weakref.WeakValueDictionary()


@torch.library.custom_op("secateurs::record_step", mutates_args=("token",))
def _record_step(token: Tensor, row: Tensor, log_id: int) -> None:
    """Append ``row`` (norm before, after, threshold, clipped, skipped) to a log, at run time.

    A traced step cannot append to the log's Python lists: Dynamo would guard on their lengths
    and recompile every step (then fail ``fullgraph=True`` at the recompile limit). As an
    opaque op the append runs when the graph does; ``token`` is a dummy tensor the op
    declares it writes, so no compiler drops it as dead code.
    """
    log = _TRACED_LOGS.get(log_id)
    if log is not None:
        stats = ClipStats(row[0], row[1], row[2], row[3] > 0.5)
        log.record(stats, skipped=row[4] > 0.5)


@_record_step.register_fake
def _(token: Tensor, row: Tensor, log_id: int) -> None:
    return None


def _settle_while_tracing(guard: StepGuard, optimizer: torch.optim.Optimizer) -> bool:
    """:meth:`StepGuard.settle` run for real while Dynamo traces a step, not traced.

    A skipped step that created optimizer state (the first step of SGD-momentum, Adam, AdamW)
    is undone by dropping that state once its flag is read; a graph cannot read it nor change
    the state's structure. Dynamo calls a function marked ``_dynamo_marked_constant`` (what
    ``torch._dynamo.assume_constant_result`` sets; set here without importing Dynamo) with the
    real objects at trace time, so the last step's structure is settled before the step is
    traced again. It is traced again: the graph of the step that left a pending undo guards on
    ``guard._undo is None`` (the traced ``settle`` after this call reads it), so the next call
    recompiles and comes here. The read waits for the flag: once per recompile, not per step.
    """
    guard.settle(optimizer)
    return True


_settle_while_tracing._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _inner_step(optimizer: torch.optim.Optimizer) -> Any:
    """``optimizer.step()``; while Dynamo traces, the same without torch's two wrappers.

    The grad-mode wrapper breaks the graph on purpose (pytorch/pytorch#104053), so
    ``torch.compile(wrapped.step, fullgraph=True)`` could not trace any torch optimizer through
    it. Traced, this runs what those wrappers run: the step pre-hooks (global, then the
    optimizer's), the step function under the grad mode torch would set, the post-hooks.
    """
    if not torch.compiler.is_compiling():
        return optimizer.step()
    step = type(optimizer).step
    hooked = step.__code__ is _HOOKED
    if hooked:
        step = step.__wrapped__
    grad_mode = None
    if step.__code__ is _USE_GRAD:
        step, grad_mode = step.__wrapped__, bool(optimizer.defaults["differentiable"])
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = {}
    hooks = torch_optimizer._global_optimizer_pre_hooks, optimizer._optimizer_step_pre_hooks
    for hook in (*hooks[0].values(), *hooks[1].values()) if hooked else ():
        result = hook(optimizer, args, kwargs)
        if result is not None:
            args, kwargs = result
    if grad_mode is None:
        out = step(optimizer, *args, **kwargs)
    else:
        with torch.set_grad_enabled(grad_mode):
            out = step(optimizer, *args, **kwargs)
    post = optimizer._optimizer_step_post_hooks, torch_optimizer._global_optimizer_post_hooks
    for hook in (*post[0].values(), *post[1].values()) if hooked else ():
        hook(optimizer, args, kwargs)
    return out


class NonFiniteGradError(FloatingPointError):
    """Raised by ``nonfinite="error"`` on a step whose gradient norm is NaN or inf."""


class ClippedOptimizer(torch.optim.Optimizer):
    """An optimizer that applies a clipping rule before each step of the optimizer it wraps.

    Build it with :func:`wrap`. It is a ``torch.optim.Optimizer`` whose ``param_groups``,
    ``state`` and ``defaults`` are the inner optimizer's, so LR schedulers, GradScaler and
    checkpointing code use it unchanged; other attributes are looked up on the inner optimizer.
    ``state_dict()`` is the inner optimizer's plus a ``"clip"`` entry (rule state, log, step
    count), so a resumed run continues its thresholds and its log.

    ``copy.deepcopy`` and pickle copy the rule, log and inner optimizer but, like PyTorch's own
    optimizer hooks, no pre-clip hooks: register them again on the copy.

    Its public protocol, for code that must not import :mod:`secateurs.clip` and so tells a
    wrapper by duck typing (``hasattr(opt, "register_pre_clip_hook")``):

    * :meth:`register_pre_clip_hook` - anyone, the Pruner included, can register a pre-clip
      hook: ``hook(wrapped)`` runs on every step before the rule clips, and may change
      ``.grad`` in place (``secateurs.prune.Pruner.attach`` zeroes pruned gradients there);
    * ``.optimizer`` - the inner optimizer, whose own step hooks run after the clipping.
    """

    # GradScaler must unscale before our step (we clip unscaled gradients); never inherit the
    # inner optimizer's fused-scaling protocol through __getattr__.
    _step_supports_amp_scaling = False

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        rule: Rule | None = None,
        *,
        nonfinite: str = "skip",
        log: ClipLog | None = None,
    ) -> None:
        ok = isinstance(optimizer, torch.optim.Optimizer) and not isinstance(
            optimizer, ClippedOptimizer
        )
        check(
            ok, "optimizer", type(optimizer).__name__, "a torch.optim.Optimizer not already wrapped"
        )
        check(rule is None or isinstance(rule, Rule), "rule", rule, "a secateurs.clip rule or None")
        check(nonfinite in NONFINITE, "nonfinite", nonfinite, ", ".join(NONFINITE))
        check(log is None or isinstance(log, ClipLog), "log", log, "a ClipLog or None")
        self.optimizer = optimizer
        self.rule = rule
        self.nonfinite = nonfinite
        self.log = ClipLog() if log is None else log
        self.steps = 0
        """Number of ``step()`` calls so far (skipped ones included)."""
        self._guard = StepGuard()
        self._token = torch.zeros(())  # see _record_step
        self._pre_clip_hooks: OrderedDict[int, Callable[[ClippedOptimizer], None]] = OrderedDict()

    @property
    def log(self) -> ClipLog:
        """The :class:`~secateurs.clip.log.ClipLog` every step is recorded in."""
        return self._log

    @log.setter
    def log(self, log: ClipLog) -> None:
        check(isinstance(log, ClipLog), "log", log, "a ClipLog")
        self._log = log
        _TRACED_LOGS[id(log)] = log  # where a compiled step's records go (see _record_step)

    # -- the optimizer's own data -------------------------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        # only a Python value the last step changed in a group waits for its flag here: LR
        # schedulers read the groups after every step, and the state's other changes can wait
        self._guard.settle(self.optimizer, groups_only=True)
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        # a skipped step's structural changes are undone once its flag is on the host (see
        # StepGuard.settle): whoever reads the state through the wrapper sees them undone
        self._guard.settle(self.optimizer)
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def __getattr__(self, name: str) -> Any:
        # only called when normal lookup fails; guard against recursion before __init__ ran
        if name == "optimizer" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.optimizer, name)

    def __getstate__(self) -> dict[str, Any]:
        # hooks are often closures (unpicklable) and point at objects outside this optimizer;
        # torch.optim.Optimizer drops its hooks the same way
        self._guard.settle(self.optimizer)
        state = self.__dict__.copy()
        state.pop("_pre_clip_hooks", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_pre_clip_hooks", OrderedDict())
        self.__dict__.setdefault("_token", torch.zeros(()))
        _TRACED_LOGS[id(self._log)] = self._log

    def __repr__(self) -> str:
        return f"ClippedOptimizer({self.optimizer!r}, rule={self.rule!r}, nonfinite={self.nonfinite!r})"

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def register_pre_clip_hook(self, hook: Callable[[ClippedOptimizer], None]) -> RemovableHandle:
        """Call ``hook(self)`` on every step after the gradients are computed and before the
        rule clips them; returns a handle whose ``remove()`` unregisters it.

        Without a closure the hooks run at the start of ``step()``; with one they run after
        every closure evaluation (LBFGS line search included), just before that evaluation is
        clipped. Hooks run in registration order and may change ``.grad`` in place; the wrapper
        reads nothing on the host around them. Hooks registered with
        :meth:`register_step_pre_hook` (on the inner optimizer) run after the clipping instead.

        >>> import torch
        >>> from secateurs.clip import GlobalNorm, wrap
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = wrap(torch.optim.SGD(model.parameters(), lr=0.1), GlobalNorm(1.0))
        >>> seen = []
        >>> handle = opt.register_pre_clip_hook(lambda o: seen.append(o.steps))
        >>> model(torch.randn(8, 4)).sum().backward()
        >>> opt.step(); opt.step()
        >>> handle.remove()
        >>> opt.step()
        >>> seen
        [1, 2]
        """
        handle = RemovableHandle(self._pre_clip_hooks)
        self._pre_clip_hooks[handle.id] = hook
        return handle

    def _run_pre_clip_hooks(self) -> None:
        for hook in tuple(self._pre_clip_hooks.values()):  # a hook may remove itself
            hook(self)

    def register_step_pre_hook(self, hook: Callable[..., Any]) -> Any:
        return self.optimizer.register_step_pre_hook(hook)

    def register_step_post_hook(self, hook: Callable[..., Any]) -> Any:
        return self.optimizer.register_step_post_hook(hook)

    def register_state_dict_pre_hook(self, hook: Callable[..., Any], prepend: bool = False) -> Any:
        return self.optimizer.register_state_dict_pre_hook(hook, prepend)

    def register_state_dict_post_hook(self, hook: Callable[..., Any], prepend: bool = False) -> Any:
        return self.optimizer.register_state_dict_post_hook(hook, prepend)

    def register_load_state_dict_pre_hook(
        self, hook: Callable[..., Any], prepend: bool = False
    ) -> Any:
        return self.optimizer.register_load_state_dict_pre_hook(hook, prepend)

    def register_load_state_dict_post_hook(
        self, hook: Callable[..., Any], prepend: bool = False
    ) -> Any:
        return self.optimizer.register_load_state_dict_post_hook(hook, prepend)

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict plus ``"clip"``: rule state, log and step count."""
        self._guard.settle(self.optimizer)
        sd = self.optimizer.state_dict()
        sd["clip"] = {
            "rule": self.rule.state_dict() if self.rule is not None else {},
            "log": self.log.state_dict(),
            "steps": self.steps,
        }
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict` (or a plain optimizer state dict)."""
        sd = dict(state_dict)
        clip = sd.pop("clip", None)
        self._guard.discard()  # the loaded state replaces whatever the last step left
        self.optimizer.load_state_dict(sd)
        if clip is not None:
            if self.rule is not None:
                self.rule.load_state_dict(clip["rule"])
            self.log.load_state_dict(clip["log"])
            self.steps = int(clip["steps"])

    # -- stepping -------------------------------------------------------------------------------
    def _params(self) -> list[Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _clip(self, params: list[Tensor]) -> ClipStats:
        if self.rule is not None:
            return self.rule(params)
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            device = params[0].device if params else torch.device("cpu")
            return ClipStats.unclipped(torch.zeros((), device=device))
        return ClipStats.unclipped(total_norm(grads))

    def _error(self, stats: ClipStats) -> NonFiniteGradError:
        return NonFiniteGradError(
            f"step {self.steps}: gradient norm is {float(stats.norm_before)} (non-finite); "
            "nonfinite='error' stops training here, nonfinite='skip' would skip the step"
        )

    def _record(self, stats: ClipStats, skipped: Tensor) -> None:
        if not torch.compiler.is_compiling():
            self.log.record(stats, skipped=skipped)
            return
        device = stats.norm_before.device
        row = torch.stack(
            [stats.norm_before.float(), stats.norm_after.float().to(device),
             stats.threshold.float().to(device), stats.clipped.float().to(device),
             skipped.float().to(device)]
        )  # fmt: skip
        _record_step(self._token, row, id(self.log))

    def _check_finite(self, stats: ClipStats, ok: Tensor) -> None:
        """``nonfinite="error"``: raise before the optimizer moves (one host read per step)."""
        if torch.compiler.is_compiling():
            # a traced graph cannot branch on a value: assert in the graph instead, which raises
            # a RuntimeError with this message when the step runs (before any write-back)
            torch._assert_async(ok, NONFINITE_MESSAGE)
        elif not bool(ok):
            raise self._error(stats)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Clip the gradients with the rule, then step the inner optimizer (see :func:`wrap`)."""
        if torch.compiler.is_compiling():
            _settle_while_tracing(self._guard, self.optimizer)
        # traced, this finds nothing pending and makes the graph guard on that (see above)
        self._guard.settle(self.optimizer)
        self.steps += 1
        if closure is not None:
            return self._step_with_closure(closure)
        self._run_pre_clip_hooks()
        params = self._params()
        stats = self._clip(params)
        ok = torch.isfinite(stats.norm_before)
        if self.nonfinite == "error":
            self._check_finite(stats, ok)
        if self.nonfinite != "skip":
            loss = _inner_step(self.optimizer)
            self._record(stats, torch.zeros_like(ok))
            return loss
        stepped = [p for p in params if p.grad is not None]
        capture = self._guard.capture(self.optimizer, stepped)
        loss = _inner_step(self.optimizer)
        self._guard.restore(self.optimizer, capture, ok)
        self._record(stats, ~ok)
        return loss

    def _step_with_closure(self, closure: Callable[[], Any]) -> Any:
        params = self._params()
        with torch.enable_grad():
            loss = closure()
        self._run_pre_clip_hooks()
        stats = self._clip(params)
        ok = torch.isfinite(stats.norm_before)
        if self.nonfinite != "ignore" and not bool(ok):
            if self.nonfinite == "error":
                raise self._error(stats)
            self.log.record(stats, skipped=~ok)
            return loss

        first = True

        def clipped_closure() -> Any:
            # the first evaluation is the one just done: replay it instead of recomputing
            nonlocal first
            if first:
                first = False
                return loss
            with torch.enable_grad():
                again = closure()
            self._run_pre_clip_hooks()
            self._clip(params)
            return again

        result = self.optimizer.step(clipped_closure)
        self.log.record(stats, skipped=~ok)
        return result


def wrap(
    optimizer: torch.optim.Optimizer,
    rule: Rule | None = None,
    *,
    nonfinite: str = "skip",
    log: ClipLog | None = None,
) -> ClippedOptimizer:
    """Wrap ``optimizer`` so each ``step()`` first clips the gradients with ``rule``.

    ``rule=None`` clips nothing but still logs the gradient norm and applies ``nonfinite``.
    ``nonfinite`` decides what a step with a NaN/inf gradient norm does:

    * ``"skip"`` (default): parameters and optimizer state are left exactly as they were and
      the step is logged as skipped. No host sync: the step runs and is undone with
      ``torch.where`` (see :class:`~secateurs.clip.guard.StepGuard`). What a select cannot
      undo, such as the optimizer state the first step creates, is undone from a non-blocking
      host copy of the flag at the next step (or when ``state``/``state_dict()`` is read
      through the wrapper), so no step waits for its own flag. A step compiled with
      ``torch.compile`` (``fullgraph=True`` included) does the same from its very first step:
      the step after one that created state is traced again, and the flag is read then.
    * ``"error"``: raise :class:`NonFiniteGradError` naming the step number, before the
      optimizer moves. Checking reads the norm on the host: one sync per step. In a step
      compiled by ``torch.compile`` the check is an in-graph assertion, which raises a
      ``RuntimeError`` with the same explanation instead.
    * ``"ignore"``: step anyway (NaN goes into the parameters), as plain PyTorch does.

    ``step(closure)`` is supported, LBFGS included: the closure is evaluated once here, the
    rule clips its gradients and the optimizer reuses that evaluation; later evaluations the
    optimizer makes (LBFGS line search) are clipped by the rule as well, so stateful rules see
    them too. Pre-clip hooks (:meth:`ClippedOptimizer.register_pre_clip_hook`) run before every
    one of those clips. With a closure the finiteness check reads one flag on the host (the
    optimizers that need closures read the loss on the host anyway), and a non-finite first
    evaluation skips the step without calling the optimizer.

    See the module docstring for gradient accumulation, GradScaler and LR schedulers.
    """
    return ClippedOptimizer(optimizer, rule, nonfinite=nonfinite, log=log)
