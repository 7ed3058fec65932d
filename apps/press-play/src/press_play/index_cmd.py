"""`press-play index ...`: build, query and inspect vector indices (omni_retrieval)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from omni_model.errors import DataError
from omni_model.zoo import DEFAULT_MODEL
from press_play.common import err, out, reporting_errors
from press_play.generate_cmd import Model

index_app = typer.Typer(help="Vector indices on disk under a memory budget.", no_args_is_help=True,
                        rich_markup_mode="rich")  # fmt: skip


def _bar() -> Progress:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, console=err, transient=True, disable=not err.is_terminal)


def build(
    source: Annotated[
        Path, typer.Argument(help="A folder of .txt/.md files, a text file, or a .npy of vectors.")
    ],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="The index folder to write.")],
    model: Model = DEFAULT_MODEL,
    kind: Annotated[str, typer.Option("--kind", help="auto, flat, pq or ivfpq.")] = "auto",
    bytes_per_vector: Annotated[
        int | None, typer.Option("--bytes-per-vector", min=1, help="PQ code size; default: from --size.")
    ] = None,
    pq_bits: Annotated[
        int,
        typer.Option(
            "--pq-bits", min=4, max=16, help="Bits per PQ sub-quantizer (12: closer codes, slower)."
        ),
    ] = 8,
    size: Annotated[
        str | None, typer.Option("--size", help="Target index size (64MB, ...); picks kind and code.")
    ] = None,
    budget: Annotated[
        str | None, typer.Option("--budget", help="Resident budget to plan for (64MB, ...).")
    ] = None,
    embedder: Annotated[
        str, typer.Option("--embedder", help="minilm (all-MiniLM-L6-v2) or lm (the model's hidden states).")
    ] = "minilm",
    layer: Annotated[
        int, typer.Option("--layer", help="lm: hidden-state layer to mean-pool (negative: from the end).")
    ] = -1,
    chunk_tokens: Annotated[int, typer.Option("--chunk-tokens", min=2, help="Tokens per text chunk.")] = 128,
    shard_vectors: Annotated[
        int, typer.Option("--shard-vectors", min=1, help="Vectors per shard file.")
    ] = 65536,
) -> None:
    """Build an index from text (chunked and embedded) or from a .npy of embeddings."""
    with reporting_errors():
        from omni_kv.spec import parse_size
        from omni_retrieval import IndexConfig, build_index, load_vectors
        from omni_retrieval.index import budget_profile

        target = None if size is None else parse_size(size, "--size")
        budget_bytes = None if budget is None else parse_size(budget, "--budget")
        config = IndexConfig(kind=kind, bytes_per_vector=bytes_per_vector, target_bytes=target,  # type: ignore[arg-type]
                             shard_vectors=shard_vectors, pq_bits=pq_bits)  # fmt: skip
        meta = {"source": str(source)}
        with _bar() as bar:
            task = bar.add_task("embedding", total=None)

            def progress(what: str, done: int, total: int) -> None:
                bar.update(task, description=what, completed=done, total=total)

            if source.suffix == ".npy":
                manifest = build_index(load_vectors(source), out_dir, config, meta=meta, on_progress=progress)
            else:
                from omni_retrieval.embed import build_text_index, open_embedder

                if embedder not in ("minilm", "lm"):
                    raise DataError(f"--embedder {embedder}: expected minilm or lm")
                emb = open_embedder({"kind": embedder, "model": model, "layer": layer})
                manifest = build_text_index(source, out_dir, emb, config, chunk_tokens=chunk_tokens, meta=meta,
                                            on_progress=progress)  # fmt: skip
        prof = budget_profile(manifest, budget_bytes)
        if budget_bytes is not None:
            if budget_bytes < prof["largest_shard_bytes"]:
                raise DataError(
                    f"--budget {budget}: smaller than one shard ({prof['largest_shard_bytes']} bytes)"
                )
            (out_dir / "budget.json").write_text(json.dumps(prof, indent=1))
    out.print(f"wrote [bold]{escape(str(out_dir))}[/bold]: {manifest['count']:,} vectors of dim {manifest['dim']}, "
              f"{manifest['factory']}, {len(manifest['shards'])} shard(s), {prof['index_bytes'] / 1e6:.1f} MB "
              f"({prof['compression']:.0f}x smaller than float32)", soft_wrap=True)  # fmt: skip


def query(
    index_dir: Annotated[Path, typer.Argument(help="An index folder (press-play index build).")],
    text: Annotated[str, typer.Argument(help="What to look for.")],
    k: Annotated[int, typer.Option("-k", min=1, help="How many results.")] = 5,
    budget: Annotated[
        str | None, typer.Option("--budget", help="Resident bytes for open shards (64MB, ...).")
    ] = None,
) -> None:
    """The chunks nearest to TEXT, embedded as the index's chunks were."""
    with reporting_errors():
        from omni_kv.spec import parse_size
        from omni_retrieval import ShardedIndex, read_manifest
        from omni_retrieval.embed import open_embedder, read_chunks

        m = read_manifest(index_dir)
        emb = m["meta"].get("embedding")
        if not emb:
            raise DataError(
                f"{index_dir}: built from vectors, not text; query it from Python with ShardedIndex"
            )
        q = open_embedder(emb).embed_text(text, emb["chunk_tokens"])
        index = ShardedIndex(index_dir, None if budget is None else parse_size(budget, "--budget"))
        scores, ids = index.search(q, k)
        chunks = read_chunks(index_dir / m["meta"]["chunks"], ids[0].tolist())
    table = Table(title=f"{k} nearest chunks")
    for col in ("score", "file", "token", "text"):
        table.add_column(col)
    for s, c in zip(scores[0], chunks, strict=True):
        if c is not None:
            table.add_row(f"{s:.3f}", Path(c.file).name, str(c.start), " ".join(c.text.split())[:100])
    out.print(table)


def stats(index_dir: Annotated[Path, typer.Argument(help="An index folder.")]) -> None:
    """What an index holds and what it costs in bytes."""
    with reporting_errors():
        from omni_retrieval import read_manifest
        from omni_retrieval.index import budget_profile

        m = read_manifest(index_dir)
        prof = budget_profile(m)
    out.print(json.dumps({"count": m["count"], "dim": m["dim"], "kind": m["kind"], "factory": m["factory"],
                          "shards": len(m["shards"]), **prof}, indent=1))  # fmt: skip


def datastore(
    source: Annotated[
        Path, typer.Argument(help="A folder of .txt/.md files (each one document), or one file.")
    ],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="The datastore folder to write.")],
    model: Model = DEFAULT_MODEL,
    kind: Annotated[str, typer.Option("--kind", help="auto, flat, pq or ivfpq.")] = "auto",
    bytes_per_vector: Annotated[
        int | None, typer.Option("--bytes-per-vector", min=1, help="PQ code size.")
    ] = None,
    pq_bits: Annotated[
        int,
        typer.Option(
            "--pq-bits", min=4, max=16, help="Bits per PQ sub-quantizer (12: closer codes, slower)."
        ),
    ] = 8,
    context: Annotated[int, typer.Option("--context", min=2, help="Window the text runs in.")] = 512,
) -> None:
    """A kNN-LM datastore: the model's hidden state at every position of the text, keyed to the next
    token (use it with --knn on generate, chat and eval perplexity)."""
    with reporting_errors():
        import omni_model
        from omni_retrieval import IndexConfig
        from omni_retrieval.embed import text_files
        from omni_retrieval.knnlm import build_datastore

        lm = omni_model.load(model)
        docs = [lm.tokenizer.encode(f.read_text(encoding="utf-8")) for f in text_files(source)]
        config = IndexConfig(kind=kind, metric="l2", bytes_per_vector=bytes_per_vector, pq_bits=pq_bits)  # type: ignore[arg-type]
        with _bar() as bar:
            task = bar.add_task("hidden states", total=None)
            m = build_datastore(lm.model, docs, out_dir, config, context=min(context, lm.config.max_seq_len),
                                name=model, on_progress=lambda done, total: bar.update(task, completed=done,
                                                                                      total=total))  # fmt: skip
    out.print(
        f"wrote [bold]{escape(str(out_dir))}[/bold]: {m['count']:,} positions, {m['factory']}", soft_wrap=True
    )


index_app.command()(build)
index_app.command()(query)
index_app.command()(stats)
index_app.command()(datastore)
