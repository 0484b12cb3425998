"""What one-shot pruning did, layer by layer: :class:`OneshotResult`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["LayerResult", "OneshotResult"]


@dataclass(frozen=True)
class LayerResult:
    """One pruned weight.

    ``error`` is the relative reconstruction error ``||W X - W' X|| / ||W X||`` over the
    calibration inputs this layer saw (None when no input statistics were gathered);
    ``damping`` the SparseGPT dampening fraction used and ``damping_attempts`` how many were
    tried (more than 1: the Cholesky factorisation failed and the dampening grew).
    """

    name: str
    unit: str
    method: str
    shape: tuple[int, ...]
    params: int
    target: float
    sparsity: float
    error: float | None = None
    damping: float | None = None
    damping_attempts: int = 0
    seconds: float = 0.0
    note: str = ""


@dataclass
class OneshotResult:
    """Per-layer results plus the settings that produced them."""

    method: str
    pattern: str | None
    group: str
    layers: list[LayerResult] = field(default_factory=list)
    units: list[str] = field(default_factory=list)
    """The blocks and modules calibrated one after the other, in order."""
    seconds: float = 0.0

    @property
    def sparsity(self) -> float:
        """Fraction of the targeted weights that are zero now."""
        total = sum(layer.params for layer in self.layers)
        return sum(layer.sparsity * layer.params for layer in self.layers) / max(total, 1)

    @property
    def damping_grown(self) -> list[LayerResult]:
        """The layers whose Cholesky factorisation needed more dampening than asked for."""
        return [layer for layer in self.layers if layer.damping_attempts > 1]

    def to_dict(self, *, timings: bool = True) -> dict[str, Any]:
        """JSON-able dict; ``timings=False`` leaves out every duration (identical runs, identical dicts)."""
        layers = []
        for layer in self.layers:
            row = asdict(layer)
            row["shape"] = list(row["shape"])
            if not timings:
                row.pop("seconds")
            layers.append(row)
        out: dict[str, Any] = {
            "method": self.method, "pattern": self.pattern, "group": self.group,
            "sparsity": self.sparsity, "units": list(self.units), "layers": layers,
        }
        if timings:
            out["seconds"] = self.seconds
        return out

    def to_markdown(self, *, timings: bool = True) -> str:
        """The per-layer table in Markdown."""
        head = ["layer", "method", "target", "sparsity", "rel. error", "damping"] + (["s"] if timings else [])
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for layer in self.layers:
            error = "" if layer.error is None else f"{layer.error:.4f}"
            damping = "" if layer.damping is None else f"{layer.damping:g}" + (
                f" ({layer.damping_attempts} tries)" if layer.damping_attempts > 1 else "")
            method = layer.method + (f" ({layer.note})" if layer.note else "")
            cells = [layer.name, method, f"{layer.target:.3f}", f"{layer.sparsity:.3f}", error, damping]
            if timings:
                cells.append(f"{layer.seconds:.2f}")
            lines.append("| " + " | ".join(cells) + " |")
        pattern = f", pattern {self.pattern}" if self.pattern else ""
        summary = f"{self.method}{pattern}, {self.group}: sparsity {self.sparsity:.4f} over {len(self.layers)} weights"
        if timings:
            summary += f", {self.seconds:.1f} s"
        return summary + "\n\n" + "\n".join(lines) + "\n"
