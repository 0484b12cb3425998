"""Global norms with DTensor gradients (a one-process gloo group stands in for a real mesh)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

from secateurs.clip import AutoClip, GlobalNorm, Norm, Rule, ZClip, agc_, by_global_norm_

dist = pytest.importorskip("torch.distributed")
if not dist.is_available():  # pragma: no cover - depends on the torch build
    pytest.skip("torch.distributed is not available", allow_module_level=True)
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import Replicate, Shard, distribute_tensor  # noqa: E402


@pytest.fixture(scope="module")
def mesh() -> Iterator[object]:
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    yield init_device_mesh("cpu", (1,))
    if started:
        dist.destroy_process_group()


def plain_params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in [(8, 4), (8,), (3, 5)]:
        p = torch.nn.Parameter(torch.randn(s, generator=g))
        p.grad = torch.randn(s, generator=g) * 2
        out.append(p)
    return out


def as_dtensors(params: list[torch.nn.Parameter], mesh: object) -> list[torch.nn.Parameter]:
    out = []
    for i, p in enumerate(params):
        placement = [Shard(0)] if i % 2 == 0 else [Replicate()]
        d = torch.nn.Parameter(distribute_tensor(p.detach().clone(), mesh, placement))
        d.grad = distribute_tensor(p.grad.clone(), mesh, placement)
        out.append(d)
    return out


def test_by_global_norm_on_dtensor_grads_equals_plain_tensors(mesh: object) -> None:
    plain = plain_params(0)
    dt = as_dtensors(plain, mesh)
    norm_d = by_global_norm_(dt, 1.0)
    norm_p = by_global_norm_(plain, 1.0)
    torch.testing.assert_close(norm_d, norm_p)
    for d, p in zip(dt, plain, strict=True):
        torch.testing.assert_close(d.grad.full_tensor(), p.grad)


@pytest.mark.parametrize(
    "make", [lambda: GlobalNorm(1.0), lambda: Norm(1.0), lambda: AutoClip(), lambda: ZClip()]
)
def test_norm_rules_on_dtensor_grads_equal_plain_tensors(
    mesh: object, make: Callable[[], Rule]
) -> None:
    rule_d, rule_p = make(), make()
    for step in range(3):
        plain = plain_params(step)
        dt = as_dtensors(plain, mesh)
        sd, sp = rule_d(dt), rule_p(plain)
        torch.testing.assert_close(sd.norm_before, sp.norm_before)
        torch.testing.assert_close(sd.threshold, sp.threshold)
        for d, p in zip(dt, plain, strict=True):
            torch.testing.assert_close(d.grad.full_tensor(), p.grad)


def test_agc_on_dtensor_grads_equals_plain_tensors(mesh: object) -> None:
    plain = plain_params(0)
    dt = as_dtensors(plain, mesh)
    agc_(dt, 0.01)
    agc_(plain, 0.01)
    for d, p in zip(dt, plain, strict=True):
        torch.testing.assert_close(d.grad.full_tensor(), p.grad)
    assert any(not torch.equal(p.grad, g) for p, g in zip(plain, [q.grad for q in plain_params(0)], strict=True))
