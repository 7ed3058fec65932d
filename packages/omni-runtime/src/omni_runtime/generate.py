"""One generate loop for every engine: prefill, then sample and decode one token at a time.

The same contract as omni_model.generate (stop tokens, stop strings that never reach the streamed
text, the result's timings), over the `Engine` protocol, so a PyTorch model and an exported graph
generate through identical code; with greedy sampling their outputs can be compared token for token.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import numpy as np

from omni_model.errors import GenerationError
from omni_model.sampling_config import SamplingConfig
from omni_model.streaming import FinishReason, GenerationResult, StopStringFilter
from omni_model.tokenizer import StreamDecoder, Tokenizer
from omni_runtime.engine import Engine
from omni_runtime.sampling import sample


def generate(
    engine: Engine, prompt_ids: Sequence[int], config: SamplingConfig, *,
    on_token: Callable[[int], None] | None = None, stop_check: Callable[[Sequence[int]], bool] | None = None,
) -> GenerationResult:  # fmt: skip
    """Generate up to config.max_new_tokens after `prompt_ids`; the engine's cache is reset first."""
    n_prompt = len(prompt_ids)
    if n_prompt == 0:
        raise GenerationError("the prompt is empty; generation needs at least one token to start from")
    if n_prompt >= engine.max_seq_len:
        raise GenerationError(
            f"the prompt has {n_prompt} tokens, which leaves no room under the engine's max_seq_len ({engine.max_seq_len})"
        )
    budget = min(config.max_new_tokens, engine.max_seq_len - n_prompt)
    stop_ids = config.stop_token_ids or frozenset()
    rng = None if config.greedy else np.random.default_rng(config.seed)
    seen = np.empty(n_prompt + budget, np.int64)
    seen[:n_prompt] = prompt_ids
    use_penalty = config.repetition_penalty != 1.0
    out: list[int] = []
    finish: FinishReason = "length"
    engine.reset()
    t0 = time.perf_counter()
    logits = engine.forward(list(prompt_ids), last_only=True)[-1]
    t_first = None
    for i in range(budget):
        n_seen = n_prompt + i
        token = sample(logits, config, rng, seen[:n_seen] if use_penalty else None)
        if t_first is None:
            t_first = time.perf_counter()
        if token in stop_ids:
            finish = "stop_token"
            break
        out.append(token)
        seen[n_seen] = token
        if on_token is not None:
            on_token(token)
        if stop_check is not None and stop_check(out):
            finish = "stop_string"
            break
        if i + 1 < budget:
            logits = engine.forward([token], last_only=True)[-1]
    t_end = time.perf_counter()
    t_first = t_first if t_first is not None else t_end
    return GenerationResult(
        token_ids=tuple(out), finish_reason=finish, prefill_seconds=t_first - t0,
        decode_seconds=t_end - t_first, n_prompt=n_prompt, n_generated=len(out),
    )  # fmt: skip


def generate_text(
    engine: Engine, tokenizer: Tokenizer, prompt: str, config: SamplingConfig,
    on_text: Callable[[str], None] | None = None,
) -> GenerationResult:  # fmt: skip
    """Generate from a text prompt; stream the final text to `on_text` (stop strings held back)."""
    if config.stop_token_ids is None:
        config = dataclasses.replace(config, stop_token_ids=frozenset(tokenizer.eos_token_ids))
    stream = StreamDecoder(tokenizer)
    stops = StopStringFilter(config.stop_strings)

    def emit(piece: str) -> None:
        if piece and on_text is not None:
            on_text(piece)

    def on_token(token: int) -> None:
        emit(stops.push(stream.push(token)))

    result = generate(engine, tokenizer.encode(prompt), config, on_token=on_token,
                      stop_check=(lambda _ids: stops.stopped) if config.stop_strings else None)  # fmt: skip
    if not stops.stopped:
        emit(stops.push(stream.flush()))
        emit(stops.flush())
    return dataclasses.replace(result, text=stops.text)
