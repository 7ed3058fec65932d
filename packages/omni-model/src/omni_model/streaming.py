"""What every generate loop shares and nothing in it needs torch: the result, and stop strings."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from omni_model.errors import GenerationError

if TYPE_CHECKING:
    from omni_model.sampling_config import SamplingConfig
    from omni_model.tokenizer import Tokenizer

FinishReason = Literal["length", "stop_token", "stop_string"]


@dataclass(frozen=True)
class SpeculationStats:
    """What speculative decoding did: `steps` verification forwards, `drafted` tokens proposed to them
    and `accepted` of those kept; each step also yields one token of the target's own."""

    proposer: str
    draft_tokens: int  # the most drafts one step verifies
    steps: int
    drafted: int
    accepted: int

    @property
    def tokens_per_step(self) -> float:
        """Tokens each verification forward yields: accepted drafts plus the target's own token."""
        return (self.accepted + self.steps) / self.steps if self.steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


@dataclass(frozen=True)
class GenerationResult:
    token_ids: tuple[int, ...]  # generated tokens, without the prompt and without a final stop token
    finish_reason: FinishReason
    prefill_seconds: float  # the prompt's forward and the first token's sampling
    decode_seconds: float  # every later forward and sampling
    n_prompt: int
    n_generated: int
    text: str | None = None  # set by generate_text: the decoded text, without any stop string
    speculation: SpeculationStats | None = None  # set by speculative decoding

    @property
    def decode_steps(self) -> int:
        """Tokens after the first (a stop token counts): forwards after the prefill in plain decoding,
        so that decode tokens/s compare across plain and speculative decoding."""
        return max(self.n_generated + (self.finish_reason == "stop_token") - 1, 0)

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.n_prompt / self.prefill_seconds if self.prefill_seconds > 0 else 0.0


class StopStringFilter:
    """Streams text while watching for stop strings; never lets out any part of one.

    `push(text)` returns the text that is now safe to show. The held-back tail is the longest suffix
    that is a proper prefix of some stop string, so a stop string can only start at or after the
    text already shown, and searching from there finds the first occurrence.
    """

    def __init__(self, stop_strings: Sequence[str]) -> None:
        self.stop_strings = tuple(stop_strings)
        self.text = ""  # everything pushed, cut at the stop string once one is found
        self.shown = 0  # characters of `text` already returned
        self.stopped = False

    def push(self, new: str) -> str:
        """Add decoded text; return what may be shown now (nothing after a stop string)."""
        if self.stopped or not new:
            return ""
        self.text += new
        return self._advance(final=False)

    def flush(self) -> str:
        """Settle what is still held back at the end of generation and return what may be shown."""
        return "" if self.stopped else self._advance(final=True)

    def _advance(self, final: bool) -> str:
        # A stop string found at `hit` is the first one only if no stop string can still start before
        # it: one whose beginning ends the text (held back) might complete with the next piece.
        hits = [i for s in self.stop_strings if (i := self.text.find(s, self.shown)) >= 0]
        pending = len(self.text) if final else len(self.text) - self._held_back()
        if hits and min(hits) <= pending:
            self.stopped = True
            self.text = self.text[: min(hits)]
            return self._release(len(self.text))
        return self._release(pending)

    def _held_back(self) -> int:
        tail = self.text[self.shown :]
        longest = 0
        for s in self.stop_strings:
            for n in range(min(len(s) - 1, len(tail)), longest, -1):
                if tail.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def _release(self, end: int) -> str:
        piece = self.text[self.shown : end]
        self.shown = max(self.shown, end)
        return piece


def token_budget(n_prompt: int, max_seq_len: int, config: SamplingConfig, what: str = "model") -> int:
    """How many tokens may follow a prompt of n_prompt tokens; a one-line error when none may."""
    if n_prompt == 0:
        raise GenerationError("the prompt is empty; generation needs at least one token to start from")
    if n_prompt >= max_seq_len:
        raise GenerationError(
            f"the prompt has {n_prompt} tokens, which leaves no room under the {what}'s max_seq_len ({max_seq_len})"
        )
    # The last generated token is never fed back, so prompt + new tokens may fill max_seq_len exactly.
    return min(config.max_new_tokens, max_seq_len - n_prompt)


def decode_loop(
    n_prompt: int, budget: int, config: SamplingConfig, prefill: Callable[[], Any],
    pick: Callable[[Any, int], int], step: Callable[[int, int], Any],
    on_token: Callable[[int], None] | None = None, stop_check: Callable[[Sequence[int]], bool] | None = None,
) -> GenerationResult:  # fmt: skip
    """The generate loop every backend shares. `prefill()` gives the prompt's last logits;
    `pick(logits, n_seen)` samples the next token; `step(token, n_seen)` records it at position
    n_seen and returns the logits after it. Timings, stop tokens and stop checks are handled here."""
    stop_ids = config.stop_token_ids or frozenset()
    out: list[int] = []
    finish: FinishReason = "length"
    t0 = time.perf_counter()
    logits = prefill()
    t_first = None
    for i in range(budget):
        token = pick(logits, n_prompt + i)
        if t_first is None:
            t_first = time.perf_counter()
        if token in stop_ids:
            finish = "stop_token"
            break
        out.append(token)
        if on_token is not None:
            on_token(token)
        if stop_check is not None and stop_check(out):
            finish = "stop_string"
            break
        if i + 1 < budget:  # the last token needs no forward: nothing samples from its logits
            logits = step(token, n_prompt + i)
    t_end = time.perf_counter()
    t_first = t_first if t_first is not None else t_end
    return GenerationResult(
        token_ids=tuple(out), finish_reason=finish, prefill_seconds=t_first - t0,
        decode_seconds=t_end - t_first, n_prompt=n_prompt, n_generated=len(out),
    )  # fmt: skip


def stream_text(
    tokenizer: Tokenizer, prompt: str, config: SamplingConfig, on_text: Callable[[str], None] | None,
    run: Callable[..., GenerationResult],
) -> GenerationResult:  # fmt: skip
    """Text in, streamed text out around a token-level generate `run(ids, config, on_token=,
    stop_check=)`: stop tokens default to the tokenizer's EOS tokens, and stop strings never reach
    `on_text` or the returned text."""
    from omni_model.tokenizer import StreamDecoder

    if config.stop_token_ids is None:
        config = dataclasses.replace(config, stop_token_ids=frozenset(tokenizer.eos_token_ids))
    stream = StreamDecoder(tokenizer)
    stops = StopStringFilter(config.stop_strings)

    def emit(piece: str) -> None:
        if piece and on_text is not None:
            on_text(piece)

    def on_token(token: int) -> None:
        emit(stops.push(stream.push(token)))

    result = run(tokenizer.encode(prompt), config, on_token=on_token,
                 stop_check=(lambda _ids: stops.stopped) if config.stop_strings else None)  # fmt: skip
    if not stops.stopped:
        emit(stops.push(stream.flush()))
        emit(stops.flush())
    return dataclasses.replace(result, text=stops.text)
