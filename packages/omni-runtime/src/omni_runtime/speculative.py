"""Speculative decoding over the Engine protocol: a proposer drafts tokens, one forward verifies them.

Each step feeds the engine the last sampled token followed by up to `draft_tokens` drafts and gets
logits for every position. Row i is the target's distribution after draft i-1, so drafts are checked
in order and the first miss ends the step; the target's own token from the row after the last kept
draft is always added, so every step yields at least one token. Rejected drafts leave the KV cache by
`engine.rollback`, which every cache kind of omni-kv supports.

Verification (Leviathan et al. 2023, arXiv:2211.17192; Chen et al. 2023, arXiv:2302.01318):
- greedy: a draft is kept when it is the target's argmax, so the output equals plain greedy decoding
  token for token where the engine computes a position the same in a step as among several rows
  (float32 graphs; an `exact` OrtEngine, whose one-token calls run as two rows: the loop then fills
  the second row with a one-token guess when the proposer has none);
- sampling: draft x drawn from q is kept with probability min(1, p(x) / q(x)); on a miss the token is
  drawn from max(p - q, 0), renormalised. Every token then follows the target's p exactly. p and q are
  the processed distributions (repetition penalty, temperature, top-k, top-p, min-p) that plain
  sampling uses; proposers that do not sample (prompt lookup, heads) have q = a point mass.

Proposers: `PromptLookup` (n-grams of the text so far), `DraftModel` (a smaller engine with the same
vocabulary) and `HeadsProposer` (Medusa-style heads reading the target's hidden state).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from omni_model.errors import GenerationError
from omni_model.sampling_config import SamplingConfig
from omni_model.streaming import FinishReason, GenerationResult, SpeculationStats, token_budget
from omni_runtime.engine import Engine, EngineError
from omni_runtime.sampling import process_logits

MAX_DRAFT_TOKENS = 16


@dataclass(frozen=True)
class Draft:
    tokens: list[int]
    q: np.ndarray | None = (
        None  # (len(tokens), V): the distributions they were drawn from; None: point masses
    )
    # A tree instead of a chain: parents[i] is the index of token i's parent among the tokens, -1 for the
    # last sampled token. Siblings are tried in order (point masses only).
    parents: list[int] | None = None  # fmt: skip


class Proposer(Protocol):
    name: str
    needs_hidden: bool  # the step passes the target's hidden state at the last position to `propose`

    def reset(self) -> None:
        """Forget the previous sequence."""
        ...

    def propose(self, context: Sequence[int], k: int, hidden: np.ndarray | None, pick: Picker) -> Draft:
        """Up to k tokens to follow `context` (prompt and every token so far)."""
        ...


class Picker:
    """Turns logits into a token the way the generate loop does (processing, greedy or a draw from the
    shared generator), and gives the processed distribution a sampled draft needs as its q."""

    def __init__(self, config: SamplingConfig, rng: np.random.Generator | None) -> None:
        self.config, self.rng = config, rng
        self.penalty = config.repetition_penalty != 1.0

    def probs(self, logits: np.ndarray, seen: Sequence[int]) -> np.ndarray:
        z = process_logits(logits, self.config, np.asarray(seen, np.int64) if self.penalty else None)
        z = z.astype(np.float64)
        e = np.exp(z - z.max())
        return e / e.sum()

    def greedy(self, logits: np.ndarray, seen: Sequence[int]) -> int:
        return int(
            np.argmax(
                process_logits(logits, self.config, np.asarray(seen, np.int64) if self.penalty else None)
            )
        )

    def draw(self, p: np.ndarray) -> int:
        assert self.rng is not None
        return int(self.rng.choice(p.shape[0], p=p))


def verify(logits: np.ndarray, draft: Draft, seen: list[int], pick: Picker) -> tuple[int, int]:
    """(drafts kept, the target's next token). logits (k+1, V): row i follows `seen` plus drafts < i."""
    k = len(draft.tokens)
    if pick.config.greedy:
        for i, d in enumerate(draft.tokens):
            t = pick.greedy(logits[i], seen + draft.tokens[:i])
            if t != d:
                return i, t
        return k, pick.greedy(logits[k], seen + draft.tokens)
    rng = pick.rng
    assert rng is not None
    for i, d in enumerate(draft.tokens):
        p = pick.probs(logits[i], seen + draft.tokens[:i])
        qd = 1.0 if draft.q is None else float(draft.q[i, d])
        if qd > 0 and rng.random() < min(1.0, p[d] / qd):
            continue
        if draft.q is None:
            residual = p.copy()
            residual[d] = 0.0
        else:
            residual = np.maximum(p - draft.q[i], 0.0)
        total = residual.sum()
        return i, pick.draw(residual / total if total > 0 else p)
    return k, pick.draw(pick.probs(logits[k], seen + draft.tokens))


def verify_tree(logits: np.ndarray, draft: Draft, seen: list[int], pick: Picker) -> tuple[list[int], int]:
    """(the kept path, as indices into the draft's tokens; the target's next token). logits (1 + n, V): row 0
    follows `seen`, row 1 + i follows the path to token i. Greedy: follow the child equal to the argmax.
    Sampling: try the children in order, keeping child x with probability r(x) and otherwise removing x
    from r and renormalising (r starts as p): the token that comes out, kept or drawn from what is left
    of r, is distributed as p (recursive rejection sampling with point-mass drafts)."""
    assert draft.parents is not None
    children: dict[int, list[int]] = {}
    for i, parent in enumerate(draft.parents):
        children.setdefault(parent, []).append(i)
    path: list[int] = []
    node, row = -1, 0
    while True:
        context = seen + [draft.tokens[i] for i in path]
        kids = children.get(node, [])
        if pick.config.greedy:
            t = pick.greedy(logits[row], context)
            nxt = next((c for c in kids if draft.tokens[c] == t), None)
            if nxt is None:
                return path, t
        else:
            r = pick.probs(logits[row], context)
            nxt = None
            for c in kids:
                x = draft.tokens[c]
                total = r.sum()
                if total > 0 and r[x] > 0 and pick.rng.random() < r[x] / total:  # type: ignore[union-attr]
                    nxt = c
                    break
                r[x] = 0.0
            if nxt is None:
                total = r.sum()
                return path, pick.draw(r / total if total > 0 else pick.probs(logits[row], context))
        path.append(nxt)
        node, row = nxt, nxt + 1


def speculative_generate(
    engine: Engine, prompt_ids: Sequence[int], config: SamplingConfig, proposer: Proposer, *,
    draft_tokens: int = 4, on_token: Callable[[int], None] | None = None,
    stop_check: Callable[[Sequence[int]], bool] | None = None,
) -> GenerationResult:  # fmt: skip
    """`generate`'s contract (stop tokens, stop checks, timings, the budget) with drafted tokens
    verified several per forward; the result's `speculation` holds the acceptance statistics."""
    if not (
        isinstance(draft_tokens, int)
        and not isinstance(draft_tokens, bool)
        and 1 <= draft_tokens <= MAX_DRAFT_TOKENS
    ):
        raise GenerationError(
            f"draft tokens must be an integer in 1..{MAX_DRAFT_TOKENS}, got {draft_tokens!r}"
        )
    if proposer.needs_hidden and not hasattr(engine, "forward_hidden"):
        raise EngineError(
            f"the {engine.name} engine cannot return hidden states, which {proposer.name} needs"
        )
    if getattr(proposer, "tree", None) and not hasattr(engine, "forward_tree"):
        raise EngineError(
            f"tree verification needs the PyTorch engine; the {engine.name} engine verifies chains"
        )
    n_prompt = len(prompt_ids)
    budget = token_budget(n_prompt, engine.max_seq_len, config, "engine")
    pick = Picker(config, None if config.greedy else np.random.default_rng(config.seed))
    stop_ids = config.stop_token_ids or frozenset()
    seen, out = list(prompt_ids), []
    finish: FinishReason = "length"
    steps = drafted = accepted = 0
    two_rows = getattr(engine, "exact", False)  # an exact OrtEngine runs a one-token call as two rows

    def run(
        ids: list[int], parents: list[int] | None = None, last_only: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None]:
        if parents is not None:
            return engine.forward_tree(ids, parents)  # type: ignore[attr-defined]
        if proposer.needs_hidden:
            return engine.forward_hidden(ids, last_only=last_only)  # type: ignore[attr-defined]
        return engine.forward(ids, last_only=last_only), None

    def emit(token: int) -> bool:
        """Record a token; True when generation ends with it."""
        nonlocal finish
        if token in stop_ids:
            finish = "stop_token"
            return True
        out.append(token)
        seen.append(token)
        if on_token is not None:
            on_token(token)
        if stop_check is not None and stop_check(out):
            finish = "stop_string"
            return True
        return len(out) >= budget

    engine.reset()
    proposer.reset()
    t0 = time.perf_counter()
    logits, hidden = run(list(prompt_ids), last_only=True)  # the prompt's last row only
    token = pick.greedy(logits[-1], seen) if config.greedy else pick.draw(pick.probs(logits[-1], seen))
    h = None if hidden is None else hidden[-1]
    t_first = time.perf_counter()
    done = emit(token)
    pending: list[int] = []  # kept tree tokens not in the cache yet: they lead the next forward
    while not done:
        k = min(draft_tokens, budget - len(out) - 1)
        draft = proposer.propose(seen, k, h, pick) if k > 0 else Draft([])
        if not draft.tokens and k > 0 and two_rows:  # the engine computes a second row anyway: fill it
            draft = Draft(_follower(seen))
        if draft.parents is None:
            draft = Draft(draft.tokens[:k], None if draft.q is None else draft.q[:k])
        else:
            draft = _prune(draft, k)
        if draft.parents is None or not draft.tokens:
            if draft.tokens:
                logits, hidden = run([*pending, token, *draft.tokens])
                logits, hidden = logits[len(pending) :], None if hidden is None else hidden[len(pending) :]
            else:  # nothing to verify: a plain step, which needs only the last row
                logits, hidden = run([*pending, token], last_only=True)
            n, token = verify(logits, Draft(draft.tokens, draft.q), seen, pick)
            engine.rollback(len(draft.tokens) - n)
            kept, pending = draft.tokens[:n], []
            h = None if hidden is None else hidden[n]
        else:  # pending and the last token as a chain, the drafts as a tree under it
            root = len(pending)
            parents = [i - 1 for i in range(root + 1)] + [
                root if p < 0 else root + 1 + p for p in draft.parents
            ]
            logits, hidden = run([*pending, token, *draft.tokens], parents)
            path, token = verify_tree(logits[root:], draft, seen, pick)
            engine.rollback(
                len(draft.tokens)
            )  # the tree leaves the cache; its kept path leads the next forward
            kept = pending = [draft.tokens[i] for i in path]
            h = None if hidden is None else hidden[root + 1 + path[-1] if path else root]
            n = len(path)
        steps, drafted, accepted = steps + 1, drafted + len(draft.tokens), accepted + n
        for t in (*kept, token):
            if done := emit(t):
                break
    t_end = time.perf_counter()
    stats = SpeculationStats(proposer.name, draft_tokens, steps, drafted, accepted)
    return GenerationResult(
        token_ids=tuple(out), finish_reason=finish, prefill_seconds=t_first - t0, decode_seconds=t_end - t_first,
        n_prompt=n_prompt, n_generated=len(out), speculation=stats,
    )  # fmt: skip


def _follower(context: Sequence[int]) -> list[int]:
    """The token that followed the latest earlier occurrence of the last token: a one-token guess."""
    a = np.asarray(context, np.int64)
    hits = np.flatnonzero(a[:-1] == a[-1])
    return [int(a[hits[-1] + 1])] if hits.size else []


class PromptLookup:
    """Prompt lookup decoding (Saxena 2023): find the latest earlier occurrence of the context's last
    n tokens (n from `max_ngram` down to `min_ngram`) and propose the tokens that followed it. Pays
    off when the answer repeats its input: editing, summarising, code, extraction."""

    needs_hidden = False

    def __init__(self, max_ngram: int = 4, min_ngram: int = 2) -> None:
        """A match of one token proposes too often to pay: on the editing prompts of BENCHMARKS.md
        n-grams of 2..4 decode 1.59-1.64x as fast as plain decoding where 1..3 give 1.45x, and on
        open-ended ones they stop costing (1.0x against 0.95x)."""
        if not 1 <= min_ngram <= max_ngram <= 64:
            raise GenerationError(
                f"prompt lookup needs 1 <= min_ngram <= max_ngram <= 64, got {min_ngram}, {max_ngram}"
            )
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.name = "lookup"

    def reset(self) -> None:
        pass

    def propose(self, context: Sequence[int], k: int, hidden: np.ndarray | None, pick: Picker) -> Draft:
        a = np.asarray(context, np.int64)
        for n in range(min(self.max_ngram, len(a) - 1), self.min_ngram - 1, -1):
            # windows starting at 0..len-n-1: each has at least one token after it
            w = np.lib.stride_tricks.sliding_window_view(a[:-1], n)
            hits = np.flatnonzero((w == a[-n:]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                return Draft(a[start : start + k].tolist())
        return Draft([])


class DraftModel:
    """A smaller model with the target's vocabulary drafts k tokens, one forward each, on its own engine
    (greedy, or sampled from its processed distribution, which then is the q of verification). Its cache
    keeps the longest prefix it shares with the context between steps."""

    needs_hidden = False

    def __init__(
        self, engine: Engine, target_vocab: int, name: str = "draft", *, greedy: bool = False
    ) -> None:
        """`greedy`: draft the draft model's argmax even when sampling (q is then a point mass; the
        output distribution is the target's either way)."""
        if engine.vocab_size != target_vocab:
            raise GenerationError(
                f"the draft model's vocabulary has {engine.vocab_size} tokens; the target's has {target_vocab}"
            )
        self.engine, self.name, self.greedy = engine, name, greedy
        self.cached: list[int] = []

    def reset(self) -> None:
        self.engine.reset()
        self.cached = []

    def propose(self, context: Sequence[int], k: int, hidden: np.ndarray | None, pick: Picker) -> Draft:
        room = self.engine.max_seq_len - len(context)
        k = min(k, room)
        if k <= 0:
            return Draft([])
        same = 0
        for a, b in zip(self.cached, context, strict=False):
            if a != b:
                break
            same += 1
        same = min(same, len(context) - 1)  # at least one token to feed: its logits start the draft
        self.engine.rollback(len(self.cached) - same)
        logits = self.engine.forward(list(context[same:]), last_only=True)[-1]
        self.cached = list(context)
        seen, tokens, qs = list(context), [], []
        for i in range(k):
            if pick.config.greedy or self.greedy:
                t = pick.greedy(logits, seen)
            else:
                q = pick.probs(logits, seen)
                t = pick.draw(q)
                qs.append(q)
            tokens.append(t)
            seen.append(t)
            if i + 1 < k:
                logits = self.engine.forward([t], last_only=True)[-1]
                self.cached.append(t)
        return Draft(tokens, np.stack(qs) if qs else None)


def _prune(draft: Draft, k: int) -> Draft:
    """A tree cut to the nodes at depth <= k (the budget's end)."""
    assert draft.parents is not None
    depth: list[int] = []
    for p in draft.parents:
        depth.append(1 if p < 0 else depth[p] + 1)
    keep = [i for i, d in enumerate(depth) if d <= k]
    if len(keep) == len(draft.tokens):
        return draft
    where = {i: j for j, i in enumerate(keep)}
    return Draft([draft.tokens[i] for i in keep], None, [where.get(draft.parents[i], -1) for i in keep])


class HeadsProposer:
    """Medusa-style heads: head j reads the target's final hidden state at the last position and
    proposes the token j+1 ahead. As a chain: the heads' top-1 tokens. As a tree (`tree`, Medusa's
    "choices"): each tuple is a path of candidate ranks, one per head, e.g. (0, 1) = head 1's best
    then head 2's second; every prefix of a path must be a path too. `top_ids(hidden)` returns
    (n_heads, top) token ids, best first (omni_runtime.heads: TorchHeads or OrtHeads)."""

    needs_hidden = True

    def __init__(self, heads: HeadsLike, tree: Sequence[tuple[int, ...]] | None = None) -> None:
        self.heads, self.name = heads, "heads" if tree is None else f"heads, tree of {len(tree)}"
        self.tree = None if tree is None else sorted({tuple(c) for c in tree}, key=lambda c: (len(c), c))
        if self.tree is not None:
            top = getattr(heads, "top", 1)
            for c in self.tree:
                if (
                    not c
                    or len(c) > heads.n_heads
                    or min(c) < 0
                    or max(c) >= top
                    or (len(c) > 1 and c[:-1] not in self.tree)
                ):
                    raise GenerationError(
                        f"tree path {c}: needs 1..{heads.n_heads} ranks in 0..{top - 1}, its prefix a path too"
                    )

    def reset(self) -> None:
        pass

    def propose(self, context: Sequence[int], k: int, hidden: np.ndarray | None, pick: Picker) -> Draft:
        assert hidden is not None
        top = self.heads.top_ids(hidden)  # (n_heads, top)
        if self.tree is None:
            return Draft([int(t) for t in top[:k, 0]])
        index = {c: i for i, c in enumerate(self.tree)}
        return Draft([int(top[len(c) - 1, c[-1]]) for c in self.tree], None,
                     [index[c[:-1]] if len(c) > 1 else -1 for c in self.tree])  # fmt: skip


class HeadsLike(Protocol):
    n_heads: int

    def top_ids(self, hidden: np.ndarray) -> np.ndarray:
        """(n_heads, top) token ids for one hidden state (D,), best first."""
        ...
