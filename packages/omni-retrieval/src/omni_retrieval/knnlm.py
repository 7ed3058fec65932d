"""kNN-LM (Khandelwal et al. 2020): the model's next-token distribution mixed with one read off the
nearest neighbours of its current hidden state in a datastore of (hidden state, next token) pairs.

The datastore is an index folder (omni_retrieval.index, L2 distance) whose vector i is the final
hidden state (the lm_head's input) at some position of a corpus and whose `values.npy` entry i is the
token that followed. At a position with hidden state h, the k nearest keys give
p_knn(v) = sum over neighbours with value v of softmax(-d / temperature), and the prediction is
p = lambda * p_knn + (1 - lambda) * p_lm.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from omni_retrieval.errors import RetrievalError
from omni_retrieval.index import IndexConfig, ShardedIndex, build_index, read_manifest

VALUES = "values.npy"


@dataclass(frozen=True)
class KNNConfig:
    # The defaults are what BENCHMARKS.md's retrieval run tuned for SmolLM2 (the default model) on a
    # validation play: 1024 neighbours, as the paper searches (16 lowered held-out perplexity 7%, 1024
    # 14%). The temperature follows the scale of a model's hidden states: tune it for another model.
    k: int = 1024
    lam: float = 0.3  # weight of the neighbours' distribution
    temperature: float = 66.8  # on squared L2 distances
    budget_bytes: int | None = None  # resident shards while searching

    def __post_init__(self) -> None:
        if self.k < 1 or not 0.0 <= self.lam <= 1.0 or self.temperature <= 0:
            raise RetrievalError(f"kNN-LM needs k >= 1, 0 <= lambda <= 1, temperature > 0; got {self}")

    @classmethod
    def parse(cls, text: str) -> KNNConfig:
        """ "k=64,lambda=0.1,temperature=100" (any of them; the rest keep their defaults)."""
        names = {"k": ("k", int), "lambda": ("lam", float), "temperature": ("temperature", float)}
        given: dict = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            if not sep or key.strip() not in names:
                raise RetrievalError(f"kNN-LM setting {part!r}: expected k=N, lambda=X or temperature=X")
            field, kind = names[key.strip()]
            try:
                given[field] = kind(value)
            except ValueError:
                what = "an integer" if kind is int else "a number"
                raise RetrievalError(f"kNN-LM setting {part!r}: {value!r} is not {what}") from None
        return cls(**given)


@torch.inference_mode()
def datastore_states(
    model, documents: Sequence[Sequence[int]], *, context: int = 512,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Keys (N, D) float32, the hidden state (the lm_head's input) at every position of every document
    but its last, and values (N,) int32, the token after it; the text runs in windows of `context`."""
    if context < 1:
        raise RetrievalError(f"context must be >= 1, got {context}")
    keys, values = [], []
    total = sum(max(len(d) - 1, 0) for d in documents)
    done = 0
    for doc in documents:
        ids = torch.as_tensor(list(doc), dtype=torch.long)
        for s in range(0, ids.numel() - 1, context):
            w = ids[s : s + context + 1]  # the window and the token after it
            keys.append(model.hidden_states(w[None, :-1])[0].float().numpy())
            values.append(w[1:].numpy().astype(np.int32))
            done += w.numel() - 1
            if on_progress is not None:
                on_progress(done, total)
    if not keys:
        raise RetrievalError("a kNN-LM datastore needs documents of at least 2 tokens")
    return np.concatenate(keys), np.concatenate(values)


def write_datastore(
    keys: np.ndarray, values: np.ndarray, out: str | Path, config: IndexConfig | None = None, *,
    vocab_size: int, name: str = "", on_progress: Callable[[str, int, int], None] | None = None,
) -> dict:  # fmt: skip
    """An L2 index folder of `keys` with values.npy beside it; returns its manifest."""
    if keys.ndim != 2 or values.shape != (keys.shape[0],):
        raise RetrievalError(f"keys {keys.shape} and values {values.shape} do not pair up")
    cfg = config or IndexConfig(kind="auto", metric="l2")
    if cfg.metric != "l2":
        raise RetrievalError("a kNN-LM datastore compares hidden states by L2 distance (metric='l2')")
    vals = values.astype(np.int32)

    def extra(folder: Path) -> None:
        np.save(folder / VALUES, vals)

    meta = {"knnlm": {"model": name, "vocab_size": vocab_size, "dim": keys.shape[1], "values": VALUES}}
    return build_index(keys, out, cfg, meta=meta, extra=extra, on_progress=on_progress)


def build_datastore(
    model, documents: Sequence[Sequence[int]], out: str | Path, config: IndexConfig | None = None, *,
    context: int = 512, name: str = "", on_progress: Callable[[int, int], None] | None = None,
) -> dict:  # fmt: skip
    """datastore_states of the documents written by write_datastore."""
    keys, values = datastore_states(model, documents, context=context, on_progress=on_progress)
    return write_datastore(keys, values, out, config, vocab_size=model.config.vocab_size, name=name)


class KNNLM:
    """A datastore opened for mixing into a model's predictions."""

    def __init__(
        self, folder: str | Path, config: KNNConfig | None = None, *, vocab_size: int, dim: int
    ) -> None:
        self.config = config or KNNConfig()
        folder = Path(folder)
        m = read_manifest(folder)
        info = m["meta"].get("knnlm")
        if not info:
            raise RetrievalError(f"{folder}: not a kNN-LM datastore (built by build_datastore)")
        if (info["vocab_size"], info["dim"]) != (vocab_size, dim):
            raise RetrievalError(f"{folder}: a datastore for vocab {info['vocab_size']} and hidden size {info['dim']}; "
                                 f"this model has {vocab_size} and {dim}")  # fmt: skip
        try:
            self.values = np.load(folder / VALUES, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise RetrievalError(
                f"{folder / VALUES}: not readable: {' '.join(str(e).split())[:120]}"
            ) from None
        if self.values.shape != (m["count"],) or self.values.dtype.kind not in "iu":
            raise RetrievalError(
                f"{folder / VALUES}: expected {m['count']} token ids, got {self.values.dtype} {self.values.shape}"
            )
        if self.values.size and (int(self.values.max()) >= vocab_size or int(self.values.min()) < 0):
            raise RetrievalError(f"{folder / VALUES}: token ids outside the vocabulary of {vocab_size}")
        self.index = ShardedIndex(folder, self.config.budget_bytes)
        self.vocab_size = vocab_size

    def mix(self, logits: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Log-probabilities (T, V) of lambda * p_knn + (1 - lambda) * p_lm for logits (T, V) and the
        hidden states (T, D) that produced them."""
        c = self.config
        scores, ids = self.index.search(hidden.float().numpy(), c.k)  # scores: -squared distance
        w = torch.from_numpy(scores / c.temperature).float()
        w = torch.where(torch.from_numpy(ids >= 0), w, torch.full_like(w, -torch.inf)).softmax(
            dim=-1
        )  # (T, k)
        tok = torch.from_numpy(np.where(ids >= 0, self.values[np.maximum(ids, 0)], 0).astype(np.int64))
        p_knn = torch.zeros(logits.shape[0], self.vocab_size).scatter_add_(1, tok, w)
        p = c.lam * p_knn + (1 - c.lam) * logits.float().softmax(dim=-1)
        return p.clamp_min(1e-30).log()
