"""Medusa heads (Cai et al. 2024, arXiv:2401.10774): extra next-next-token heads on a frozen base, the
drafts of self-speculative decoding. Head k maps the base's final hidden state at t to logits for token
t+k+1 through `layers` residual blocks x + SiLU(W x + b) and the base's own frozen lm_head (shared, not
saved). W = b = 0 at init, so every head starts as the base's next-token head. This is Medusa's parallel
form; DeepSeek-V3's MTP (omni_model.mtp) is the sequential one.

The heads themselves (HeadsConfig, MedusaHeads, save_heads, load_heads) live in omni_model.medusa, where
omni_runtime finds them to draft with. Training is Medusa's self-distillation: head k at t learns the base's greedy token at t+k+1
(or its whole distribution, `soft`), on text or on the base's own greedy continuations
(`greedy_continuations`), which is what the heads meet when drafting. Heads save on their own
(`heads.safetensors` + `heads.json`, naming the base they belong to).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omni_model.decoder import Decoder
from omni_model.medusa import HeadsConfig, MedusaHeads, head_logits, load_heads, save_heads
from omni_train.data import token_dtype, val_batches
from omni_train.errors import TrainError
from omni_train.loop import Batch

WEIGHTS, META = "heads.safetensors", "heads.json"
FORMAT, VERSION = "omni-medusa-heads", 1
MAX_META_BYTES = 1 << 16  # heads.json is a config and a base name: bytes
MAX_HEADS = MAX_LAYERS = 32  # a bound for untrusted configs; Medusa uses 3-5 heads of 1 layer
Progress = Callable[[str, int, int], None]  # (what is happening, steps done, steps in all)


class HeadedModel(nn.Module):
    """A frozen base plus trainable heads; `forward(x)` gives the base's logits (B, T, V), computed
    without grad, and the heads' (n, B, T, V), or (n, B, T, len(vocab)) over the token ids `vocab`
    only (the heads then draft from that set; their output matmul, most of their training cost, shrinks
    by V / len(vocab)).

    The base is held outside the module tree (a plain attribute, not a submodule), so the loop's
    checkpoints, DDP and MoE bias balancing see only the heads, and `train()` leaves the base in eval
    mode. Keep the base and the heads on one device.
    """

    base: Decoder

    def __init__(self, base: Decoder, heads: MedusaHeads, vocab: Tensor | None = None) -> None:
        super().__init__()
        if heads.dim != base.config.dim:
            raise TrainError(f"heads of dim {heads.dim} for a base of dim {base.config.dim}")
        self.__dict__["base"] = base.eval().requires_grad_(False)
        self.heads = heads
        self.vocab = vocab
        if vocab is not None:
            v = base.config.vocab_size
            if vocab.ndim != 1 or not len(vocab) or int(vocab.min()) < 0 or int(vocab.max()) >= v:
                raise TrainError(
                    f"the heads' vocabulary must be a non-empty 1-D set of token ids in 0..{v - 1}"
                )
            self.__dict__["_head_w"] = base.lm_head.weight.detach()[vocab]  # (len(vocab), D), frozen

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            h = self.base.hidden_states(x)  # (B, T, D)
            logits = self.base.logits(h)  # (B, T, V)
        if self.vocab is None:
            return logits, head_logits(self.base, self.heads, h)  # (n, B, T, V)
        z = self.heads(h.to(self._head_w.dtype))
        return logits, F.linear(z, self._head_w).float()  # (n, B, T, len(vocab))


@dataclass
class HeadsObjective:
    """Self-distillation: head k at t against the base's greedy token at t+k+1 (the argmax of its logits
    at t+k), or KL to its distribution there (`soft`, temperature 1). Positions whose target lies past
    the window are dropped. The loss is the heads' mean weighted by decay**(k-1) (Medusa's 0.8)."""

    soft: bool = False
    decay: float = 0.8

    def __post_init__(self) -> None:
        if not (isinstance(self.decay, int | float) and 0 < self.decay <= 1):
            raise TrainError(f"HeadsObjective.decay must be in (0, 1], got {self.decay!r}")

    def head_losses(self, logits: Tensor, heads: Tensor, vocab: Tensor | None = None) -> list[Tensor]:
        """Per head k, the mean loss over positions 0..T-k-1 of (n, B, T, V) head logits, or over the
        token ids `vocab` (positions whose target lies outside it are left out)."""
        t, v = logits.shape[1], heads.shape[-1]
        lut = None
        if vocab is not None:
            if self.soft:
                raise TrainError(
                    "soft (KL) head training needs the whole vocabulary; drop the reduced vocabulary"
                )
            lut = torch.full((logits.shape[-1],), -100, dtype=torch.long, device=logits.device)
            lut[vocab] = torch.arange(len(vocab), device=logits.device)
        if t <= len(heads):
            raise TrainError(
                f"windows of {t} tokens leave head {len(heads)} no target; need seq_len > n_heads"
            )
        out = []
        for k, head in enumerate(heads, start=1):
            z, target = (
                head[:, : t - k].reshape(-1, v).float(),
                logits[:, k:].reshape(-1, logits.shape[-1]).float(),
            )
            if lut is not None:
                out.append(F.cross_entropy(z, lut[target.argmax(-1)], ignore_index=-100))
            elif self.soft:
                out.append(F.kl_div(F.log_softmax(z, -1), F.log_softmax(target, -1), log_target=True,
                                    reduction="batchmean"))  # fmt: skip
            else:
                out.append(F.cross_entropy(z, target.argmax(-1)))
        return out

    def weights(self, n: int) -> list[float]:
        """Each head's share of the loss: decay**(k-1), normalised to sum to 1."""
        w = [self.decay**k for k in range(n)]
        return [x / sum(w) for x in w]

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, float]]:
        losses = torch.stack(self.head_losses(*model(x), vocab=_vocab(model)))  # (n,)
        loss = losses @ torch.tensor(self.weights(len(losses)), device=losses.device)
        return loss, {f"head{k}_loss": float(v) for k, v in enumerate(losses.detach(), start=1)}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterator[Batch]) -> dict[str, float]:
        """Per head: top-1 accuracy against the base's greedy token (`headK_acc`, what speculative
        decoding accepts) and against the text (`headK_acc_text`); the base's own text accuracy; the
        mean number of drafts accepted in a row from head 1 (`mean_accepted`: teacher-forced on the
        text, an estimate of the acceptance length when drafting)."""
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}

        def add(key: str, value: Tensor | float, n: int) -> None:
            sums[key], counts[key] = sums.get(key, 0.0) + float(value), counts.get(key, 0) + n

        vocab = _vocab(model)
        for x, y in batches:
            logits, heads = model(x)
            t, n = x.shape[1], len(heads)
            losses = self.head_losses(logits, heads, vocab)
            greedy = logits.argmax(-1)  # (B, T)
            add("base_acc_text", (greedy == y).sum(), y.numel())
            run = torch.ones_like(greedy[:, : t - n], dtype=torch.bool)  # heads 1..k all right so far
            streak = torch.zeros_like(greedy[:, : t - n])
            for k in range(1, n + 1):
                pred = heads[k - 1, :, : t - k].argmax(-1)  # (B, T-k): the tokens k+1 ahead
                if vocab is not None:
                    pred = vocab[pred]
                ok = pred == greedy[:, k:]
                add(f"head{k}_acc", ok.sum(), ok.numel())
                add(f"head{k}_acc_text", (pred == y[:, k:]).sum(), ok.numel())
                add(f"head{k}_loss", losses[k - 1] * ok.numel(), ok.numel())
                run &= ok[:, : t - n]
                streak += run
            add("mean_accepted", streak.sum(), streak.numel())
        if not counts:
            raise TrainError("no validation tokens: the validation split is shorter than one sequence")
        out = {k: sums[k] / counts[k] for k in sums}
        w = self.weights(sum(k.endswith("_loss") for k in out))
        out["val_loss"] = sum(wk * out[f"head{k}_loss"] for k, wk in enumerate(w, start=1))
        out["val_tokens"] = counts["base_acc_text"]
        return out


@torch.inference_mode()
def head_accuracy(base: Decoder, heads: MedusaHeads, tokens: np.ndarray, seq_len: int, batch_size: int,
                  limit: int | None = None) -> dict[str, float]:  # fmt: skip
    """Top-1 accuracy of head k against the base's greedy token at t+k+1 (`headK_acc`, the speculative
    acceptance criterion) and against the text, on windows of held-out `tokens`."""
    model = HeadedModel(base, heads)
    was = heads.training
    heads.eval()
    try:
        return HeadsObjective().evaluate(model, val_batches(tokens, seq_len, batch_size, limit))
    finally:
        heads.train(was)


def sample_prompts(tokens: np.ndarray, n: int, length: int, *, seed: int = 0) -> Tensor:
    """`n` windows of `length` tokens at seeded random offsets of `tokens`, (n, length) int64."""
    for name, v, lo in (("n", n, 1), ("length", length, 1), ("seed", seed, 0)):
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= lo):
            raise TrainError(f"{name}={v!r}: must be an int >= {lo}")
    if not (isinstance(tokens, np.ndarray) and tokens.ndim == 1 and len(tokens) >= length):
        raise TrainError(f"prompts of {length} tokens need a 1-D token array at least that long")
    starts = np.random.default_rng(seed).integers(0, len(tokens) - length + 1, n)
    return torch.from_numpy(np.asarray(tokens[starts[:, None] + np.arange(length)], dtype=np.int64))


# Requests around a passage of the training text: the base answers them as it would a user, so heads
# trained on its answers meet in training the kind of text they draft in a chat (Medusa trains on chats).
INSTRUCTIONS = (
    "Summarise this passage in two sentences:",
    "Rewrite this passage in plain modern English:",
    "Continue this scene in the same style:",
    "What is happening in this passage?",
    "Correct the spelling and punctuation of this text and return it:",
    "Write a short poem inspired by these lines:",
    "Who speaks in this passage, and what do they want?",
    "Explain these lines to a student:",
)


def chat_prompts(
    tokenizer: Any, tokens: np.ndarray, n: int, passage_len: int, *, seed: int = 0
) -> list[Tensor]:
    """`n` chat prompts, each a request of INSTRUCTIONS around a `passage_len`-token passage of `tokens`
    in the tokenizer's chat template, grouped by request into (n_i, P_i) tensors of equal-length rows
    (the passage's tokens are spliced in as they are, so every row of a group has the same length)."""
    windows = sample_prompts(tokens, n, passage_len, seed=seed).numpy()
    mark = "\x00PASSAGE\x00"
    groups: list[Tensor] = []
    for i, instruction in enumerate(INSTRUCTIONS):
        rows = windows[i :: len(INSTRUCTIONS)]
        if not len(rows):
            continue
        text = tokenizer.apply_chat_template([{"role": "user", "content": f"{instruction}\n\n{mark}"}])
        head, _, tail = text.partition(mark)
        pre, post = (
            tokenizer.encode(head, add_special_tokens=False),
            tokenizer.encode(tail, add_special_tokens=False),
        )
        groups.append(torch.tensor([pre + list(map(int, r)) + post for r in rows], dtype=torch.long))
    return groups


@torch.inference_mode()
def greedy_continuations(base: Decoder, prompts: Tensor, new_tokens: int, batch_size: int,
                         on_progress: Progress | None = None) -> np.ndarray:  # fmt: skip
    """The base's greedy continuations of `prompts` (N, P), `batch_size` rows per KV-cached batch, as one
    token stream: each prompt, its continuation up to and including the first EOS, EOS where none came
    (with no EOS id in the config: no separator). uint16 or uint32, as `TokenDataset` stores tokens."""
    cfg = base.config
    if not (
        isinstance(prompts, Tensor)
        and prompts.ndim == 2
        and prompts.numel()
        and not (prompts.is_floating_point() or prompts.is_complex() or prompts.dtype == torch.bool)
    ):
        raise TrainError(f"prompts must be a non-empty (N, P) integer tensor, got {_desc(prompts)}")
    for name, v in (("new_tokens", new_tokens), ("batch_size", batch_size)):
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            raise TrainError(f"{name}={v!r}: must be an int >= 1")
    if prompts.min() < 0 or prompts.max() >= cfg.vocab_size:
        raise TrainError(f"prompts hold token ids outside the vocabulary (0..{cfg.vocab_size - 1})")
    n, p = prompts.shape
    if p + new_tokens > cfg.max_seq_len:
        raise TrainError(
            f"prompts of {p} + {new_tokens} new tokens exceed the base's context ({cfg.max_seq_len})"
        )
    report = on_progress or (lambda what, done, total: None)
    eos, device = cfg.eos_token_id, next(base.parameters()).device
    parts: list[np.ndarray] = []
    for i in range(0, n, batch_size):
        report("generating", i, n)
        chunk = prompts[i : i + batch_size].to(device, torch.long)  # (b, P)
        cont = _greedy(base, chunk, new_tokens, eos).cpu().numpy()  # (b, <= new_tokens)
        for prompt, c in zip(chunk.cpu().numpy(), cont, strict=True):
            if eos is not None:
                hit = np.flatnonzero(c == eos)
                c = c[: hit[0] + 1] if len(hit) else np.append(c, eos)
            parts += [prompt, c]
    report("generating", n, n)
    return np.concatenate(parts).astype(token_dtype(cfg.vocab_size))


def _greedy(base: Decoder, prompt: Tensor, new_tokens: int, eos: int | None) -> Tensor:
    """(b, <= new_tokens) greedy tokens after prompt (b, P): one prefill, then one token per forward;
    stops early once every row has produced EOS."""
    b, p = prompt.shape
    cache = base.make_cache(batch_size=b, max_len=p + new_tokens)
    tok = base(prompt, cache=cache, last_only=True)[:, -1].argmax(-1)  # (b,)
    out, done = [tok], torch.zeros_like(tok, dtype=torch.bool)
    for _ in range(new_tokens - 1):
        if eos is not None:
            done |= tok == eos
            if bool(done.all()):
                break
        tok = base(tok[:, None], cache=cache, last_only=True)[:, -1].argmax(-1)
        out.append(tok)
    return torch.stack(out, 1)


def _vocab(model: nn.Module) -> Tensor | None:
    return getattr(getattr(model, "module", model), "vocab", None)  # through DDP's wrapper


def _desc(v: Any) -> str:
    return f"{tuple(v.shape)} {v.dtype}" if isinstance(v, Tensor) else type(v).__name__


__all__ = [
    "HeadedModel",
    "HeadsConfig",
    "HeadsObjective",
    "MedusaHeads",
    "greedy_continuations",
    "head_accuracy",
    "load_heads",
    "sample_prompts",
    "save_heads",
]
