"""Autoregressive generation with a KV cache, at the token level and the text level.

`generate` prefills the prompt in one forward (only the last position's logits are computed), then
decodes one token per forward from the model's cache (dense, or latent for MLA models) sized
prompt + max_new_tokens. `generate_text` wraps it with a StreamDecoder for streaming text and handles stop strings: the streamed text never
shows any part of a stop string, since text that could be the start of one is held back until it
is known not to be.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from omni_model.errors import GenerationError
from omni_model.sampling import SamplingConfig, make_generator, sample
from omni_model.streaming import FinishReason, GenerationResult, StopStringFilter
from omni_model.tokenizer import StreamDecoder

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
    max_seq_len = model.config.max_seq_len
    if n_prompt == 0:
        raise GenerationError("the prompt is empty; generation needs at least one token to start from")
    if n_prompt >= max_seq_len:
        raise GenerationError(
            f"the prompt has {n_prompt} tokens, which leaves no room under the model's max_seq_len ({max_seq_len})"
        )
    # The last generated token is never fed back, so prompt + new tokens may fill max_seq_len exactly.
    budget = min(config.max_new_tokens, max_seq_len - n_prompt)
    stop_ids = config.stop_token_ids or frozenset()
    device = next(model.parameters()).device
    generator = None if config.greedy else make_generator(config.seed, device)
    use_penalty = config.repetition_penalty != 1.0

    out: list[int] = []
    finish: FinishReason = "length"
    with torch.inference_mode():
        t0 = time.perf_counter()
        # Prompt and generated ids, preallocated so the repetition penalty reads a view, not a new cat.
        seen = torch.empty(n_prompt + budget, dtype=torch.long, device=device)
        seen[:n_prompt] = prompt
        cache = model.make_cache(batch_size=1, max_len=n_prompt + budget)
        logits = model(seen[None, :n_prompt], cache=cache, last_only=True)[0, -1]  # (V,)
        t_first = None
        for i in range(budget):
            n_seen = n_prompt + i
            token = int(sample(logits, config, generator, seen[:n_seen] if use_penalty else None))
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
            if i + 1 < budget:  # the last token needs no forward: nothing samples from its logits
                logits = model(seen[n_seen : n_seen + 1][None], cache=cache, last_only=True)[0, -1]
        t_end = time.perf_counter()
    t_first = t_first if t_first is not None else t_end
    return GenerationResult(
        token_ids=tuple(out), finish_reason=finish, prefill_seconds=t_first - t0,
        decode_seconds=t_end - t_first, n_prompt=n_prompt, n_generated=len(out),
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
    tok = lm.tokenizer
    if config.stop_token_ids is None:
        config = dataclasses.replace(config, stop_token_ids=frozenset(tok.eos_token_ids))
    stream = StreamDecoder(tok)
    stops = StopStringFilter(config.stop_strings)

    def emit(piece: str) -> None:
        if piece and on_text is not None:
            on_text(piece)

    def on_token(token: int) -> None:
        emit(stops.push(stream.push(token)))

    def stop_check(_ids: Sequence[int]) -> bool:
        return stops.stopped

    result = generate(lm.model, tok.encode(prompt), config, on_token=on_token,
                      stop_check=stop_check if config.stop_strings else None)  # fmt: skip
    if not stops.stopped:
        emit(stops.push(stream.flush()))
        emit(stops.flush())
    return dataclasses.replace(result, text=stops.text)
