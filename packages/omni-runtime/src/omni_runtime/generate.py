"""One generate loop for every engine: prefill, then sample and decode one token at a time.

omni_model.streaming's loop, as omni_model.generate uses it (stop tokens, stop strings that never reach the streamed
text, the result's timings), over the `Engine` protocol, so a PyTorch model and an exported graph
generate through identical code; with greedy sampling their outputs can be compared token for token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from omni_model.sampling_config import SamplingConfig
from omni_model.streaming import GenerationResult, decode_loop, stream_text, token_budget
from omni_model.tokenizer import Tokenizer
from omni_runtime.engine import Engine
from omni_runtime.sampling import sample
from omni_runtime.speculative import Proposer, speculative_generate


def generate(
    engine: Engine, prompt_ids: Sequence[int], config: SamplingConfig, *,
    on_token: Callable[[int], None] | None = None, stop_check: Callable[[Sequence[int]], bool] | None = None,
    speculative: Proposer | None = None, draft_tokens: int = 4,
) -> GenerationResult:  # fmt: skip
    """Generate up to config.max_new_tokens after `prompt_ids`; the engine's cache is reset first.
    With a `speculative` proposer (omni_runtime.speculative), up to `draft_tokens` drafts are verified
    per forward; greedy output is the same, sampled output follows the same distribution."""
    if speculative is not None:
        return speculative_generate(engine, prompt_ids, config, speculative, draft_tokens=draft_tokens,
                                    on_token=on_token, stop_check=stop_check)  # fmt: skip
    n_prompt = len(prompt_ids)
    budget = token_budget(n_prompt, engine.max_seq_len, config, "engine")
    rng = None if config.greedy else np.random.default_rng(config.seed)
    seen = np.empty(n_prompt + budget, np.int64)
    seen[:n_prompt] = prompt_ids
    use_penalty = config.repetition_penalty != 1.0

    def pick(logits: np.ndarray, n_seen: int) -> int:
        return sample(logits, config, rng, seen[:n_seen] if use_penalty else None)

    def step(token: int, n_seen: int) -> np.ndarray:
        seen[n_seen] = token
        return engine.forward([token], last_only=True)[-1]

    engine.reset()
    return decode_loop(n_prompt, budget, config, lambda: engine.forward(list(prompt_ids), last_only=True)[-1],
                       pick, step, on_token, stop_check)  # fmt: skip


def generate_text(
    engine: Engine, tokenizer: Tokenizer, prompt: str, config: SamplingConfig,
    on_text: Callable[[str], None] | None = None, speculative: Proposer | None = None, draft_tokens: int = 4,
) -> GenerationResult:  # fmt: skip
    """Generate from a text prompt; stream the final text to `on_text` (stop strings held back)."""
    return stream_text(tokenizer, prompt, config, on_text, lambda ids, cfg, **kw: generate(
        engine, ids, cfg, speculative=speculative, draft_tokens=draft_tokens, **kw))  # fmt: skip
