"""Perplexity through any engine, with omni_model.perplexity's windows and scoring (torch-free).

Non-overlapping windows of `context` tokens; in each, every token but the first is scored given the
ones before it in the window; the engine's cache is reset between windows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from omni_model.errors import DataError
from omni_model.metrics import PerplexityResult, check_perplexity_args
from omni_runtime.engine import Engine


def perplexity(
    engine: Engine, token_ids: Sequence[int], context: int = 512, *, max_tokens: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> PerplexityResult:  # fmt: skip
    check_perplexity_args(context, max_tokens, engine.max_seq_len)
    ids = np.asarray(list(token_ids), dtype=np.int64)[:max_tokens]
    starts = [s for s in range(0, ids.size, context) if ids.size - s >= 2]
    if not starts:
        raise DataError(f"the text has {ids.size} token(s); perplexity needs at least 2")
    nll_sum, n_scored = 0.0, 0
    for i, s in enumerate(starts):
        window = ids[s : s + context]
        engine.reset()
        logits = engine.forward(window.tolist(), last_only=False)[:-1].astype(np.float64)  # (T-1, V)
        top = logits.max(axis=-1, keepdims=True)
        log_z = np.log(np.exp(logits - top).sum(axis=-1)) + top[:, 0]
        nll = log_z - logits[np.arange(window.size - 1), window[1:]]
        nll_sum += float(nll.sum())
        n_scored += nll.size
        if on_progress is not None:
            on_progress(i + 1, len(starts))
    engine.reset()
    return PerplexityResult(math.exp(nll_sum / n_scored), nll_sum, n_scored, len(starts), context)
