"""Perplexity's result and argument rules, shared by the PyTorch scorer and omni_runtime's (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass

from omni_model.errors import ConfigError


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll_sum: float  # natural-log NLL summed over the scored tokens
    n_scored: int
    n_windows: int
    context: int

    @property
    def nll_mean(self) -> float:
        return self.nll_sum / self.n_scored


def check_perplexity_args(context: object, max_tokens: object, max_seq_len: int) -> None:
    if isinstance(context, bool) or not isinstance(context, int) or context < 2:
        raise ConfigError(
            f"context must be an integer >= 2 (one token to condition on, one to score), got {context!r}"
        )
    if context > max_seq_len:
        raise ConfigError(f"context ({context}) exceeds the model's max_seq_len ({max_seq_len})")
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 2
    ):
        raise ConfigError(f"max_tokens must be an integer >= 2, got {max_tokens!r}")
