"""The settings of one generation, shared by omni_model's loop and omni_runtime's (torch-free)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from omni_model.errors import ConfigError


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off; CTRL rule over prompt + generated tokens
    seed: int | None = None  # None: a fresh random seed each generation
    stop_token_ids: frozenset[int] | None = None  # None: the tokenizer's EOS tokens (none in generate())
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens <= 0:
            raise ConfigError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not _is_finite(self.temperature) or self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ConfigError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not _is_finite(self.top_p) or not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if not _is_finite(self.min_p) or not 0 <= self.min_p <= 1:
            raise ConfigError(f"min_p must be in [0, 1] (0 = off), got {self.min_p!r}")
        if not _is_finite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise ConfigError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, frozenset):
                raise ConfigError(
                    f"stop_token_ids must be a frozenset, got {type(self.stop_token_ids).__name__}"
                )
            bad = sorted(repr(t) for t in self.stop_token_ids if not _is_int(t) or t < 0)
            if bad:
                raise ConfigError(f"stop_token_ids must hold token ids >= 0, got {', '.join(bad)}")
        if isinstance(self.stop_strings, str) or not isinstance(self.stop_strings, tuple):
            raise ConfigError(f"stop_strings must be a tuple of strings, got {self.stop_strings!r}")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ConfigError(f"stop_strings must be non-empty strings, got {self.stop_strings!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_finite(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
