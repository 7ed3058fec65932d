"""Autoregressive generation with a KV cache, at the token level and the text level.

`generate` prefills the prompt in one forward (only the last position's logits are computed), then
decodes one token per forward from the model's cache (dense, or latent for MLA models) sized
prompt + max_new_tokens. `generate_text` wraps it with a StreamDecoder for streaming text and handles stop strings: the streamed text never
shows any part of a stop string, since text that could be the start of one is held back until it
is known not to be.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from omni_model.errors import GenerationError
from omni_model.sampling import SamplingConfig, make_generator, sample
from omni_model.streaming import GenerationResult, StopStringFilter, decode_loop, stream_text, token_budget

__all__ = ["GenerationError", "GenerationResult", "StopStringFilter", "generate", "generate_text"]

if TYPE_CHECKING:
    from omni_model.loader import LoadedModel


def generate(
    model: nn.Module,
    prompt_ids: Sequence[int] | Tensor,
    config: SamplingConfig,
    *,
    on_token: Callable[[int], None] | None = None,
    stop_check: Callable[[Sequence[int]], bool] | None = None,
) -> GenerationResult:
    """Generate up to config.max_new_tokens after `prompt_ids` with `model` (a Decoder), batch 1.

    `on_token` sees each generated token as it comes; `stop_check` sees the generated ids after each
    token and ends generation ("stop_string") when it returns True. Stop token ids come from
    config.stop_token_ids (None: none; generate_text fills in the tokenizer's EOS tokens).
    """
    prompt = _prompt_tensor(prompt_ids)
    n_prompt = prompt.numel()
    budget = token_budget(n_prompt, model.config.max_seq_len, config)
    device = next(model.parameters()).device
    generator = None if config.greedy else make_generator(config.seed, device)
    use_penalty = config.repetition_penalty != 1.0
    # Prompt and generated ids, preallocated so the repetition penalty reads a view, not a new cat.
    seen = torch.empty(n_prompt + budget, dtype=torch.long, device=device)
    seen[:n_prompt] = prompt
    cache = model.make_cache(batch_size=1, max_len=n_prompt + budget)

    def pick(logits: Tensor, n_seen: int) -> int:
        return int(sample(logits, config, generator, seen[:n_seen] if use_penalty else None))

    def step(token: int, n_seen: int) -> Tensor:
        seen[n_seen] = token
        return model(seen[n_seen : n_seen + 1][None], cache=cache, last_only=True)[0, -1]

    with torch.inference_mode():
        return decode_loop(
            n_prompt, budget, config, lambda: model(seen[None, :n_prompt], cache=cache, last_only=True)[0, -1],
            pick, step, on_token, stop_check,
        )  # fmt: skip


def _prompt_tensor(prompt_ids: Sequence[int] | Tensor) -> Tensor:
    if isinstance(prompt_ids, Tensor):
        if prompt_ids.dim() == 2 and prompt_ids.shape[0] == 1:
            prompt_ids = prompt_ids[0]
        if prompt_ids.dim() != 1:
            raise GenerationError(
                f"prompt_ids must be one sequence (T,) or (1, T), got shape {tuple(prompt_ids.shape)}"
            )
        return prompt_ids.to(torch.long)
    return torch.tensor(list(prompt_ids), dtype=torch.long)


def generate_text(
    lm: LoadedModel,
    prompt: str,
    config: SamplingConfig,
    on_text: Callable[[str], None] | None = None,
) -> GenerationResult:
    """Generate from a text prompt with a loaded model; stream the text to `on_text` as it is final.

    The prompt is encoded as is (apply the chat template first for a chat model). Stop token ids
    default to the tokenizer's EOS tokens; stop strings end generation as soon as the decoded text
    contains one, and the returned and streamed text stop before it.
    """
    return stream_text(lm.tokenizer, prompt, config, on_text,
                       lambda ids, cfg, **kw: generate(lm.model, ids, cfg, **kw))  # fmt: skip
