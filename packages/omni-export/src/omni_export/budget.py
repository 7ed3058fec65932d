"""The memory a model needs on the device, against a budget: weights + KV cache at a context + runtime.

The weights are the bytes of the file the runtime maps; the KV cache is bytes per token times the
context the app will use; the runtime overhead (activations, arenas, the runtime library's own
allocations) is measured by loading the model and running it (`overhead_bytes`), or left at zero in a
first check made before anything is built. A check that fails raises BudgetError with one line naming
the figures.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from omni_export.errors import ExportError


class BudgetError(ExportError):
    """A model does not fit the device's memory budget."""


def mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB" if n < 1e9 else f"{n / 1e9:,.2f} GB"


@dataclass(frozen=True)
class MemoryBudget:
    what: str  # the model file the figures are for, e.g. "model.pte (int4)"
    budget_bytes: int
    weights_bytes: int
    kv_bytes_per_token: int
    context: int
    overhead_bytes: int = 0
    overhead_measured: bool = False

    def __post_init__(self) -> None:
        if self.budget_bytes <= 0 or self.context <= 0:
            raise BudgetError(
                f"budget and context must be positive, got {self.budget_bytes} and {self.context}"
            )

    @property
    def kv_bytes(self) -> int:
        return self.kv_bytes_per_token * self.context

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.overhead_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.budget_bytes

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"kv_bytes": self.kv_bytes, "total_bytes": self.total_bytes, "fits": self.fits}

    def describe(self) -> str:
        runtime = f" + runtime {mb(self.overhead_bytes)}" if self.overhead_measured else ""
        return (f"{self.what}: weights {mb(self.weights_bytes)} + KV cache {mb(self.kv_bytes)} at {self.context:,} "
                f"tokens{runtime} = {mb(self.total_bytes)} of a {mb(self.budget_bytes)} budget")  # fmt: skip

    def check(self) -> None:
        """Raise BudgetError when the model does not fit."""
        if self.weights_bytes > self.budget_bytes:
            raise BudgetError(
                f"{self.what}: the weights alone ({mb(self.weights_bytes)}) exceed the {mb(self.budget_bytes)} budget"
            )
        if not self.fits:
            raise BudgetError(f"does not fit: {self.describe()}; lower the context or use smaller weights")


def runtime_overhead(peak_added: int, weights_bytes: int, kv_bytes_per_token: int, tokens_held: int) -> int:
    """The runtime's own memory from a measured run: the resident bytes the run added at its peak, less
    the weights and the cache of the tokens it held. Runtimes allocate the whole cache up front but the
    pages of positions never written stay untouched (not resident), so only the used part is taken off;
    the budget then adds the cache at the full context on top."""
    return max(0, peak_added - weights_bytes - kv_bytes_per_token * tokens_held)
