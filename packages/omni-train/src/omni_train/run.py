"""The recipes end to end, as the `press-play train` commands and the benchmark run them: data, model,
objective, the loop, and the trained result written where `omni_model.load` (or `load_adapters`)
opens it.

    out/plan.json  out/metrics.jsonl  out/checkpoint/   the loop's (resumable)
    out/model/      the trained model (omni_model.save), or out/adapters/ for LoRA
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from omni_model.config import ModelConfig
from omni_model.loader import LoadedModel
from omni_train.data import TokenDataset
from omni_train.errors import TrainError
from omni_train.loop import Event, TrainConfig, TrainResult, barrier, rank, train
from omni_train.recipes import (
    CachedDistillObjective,
    DistillObjective,
    LMObjective,
    inherit_embeddings,
    student_config,
)

Progress = Callable[[str, int, int], None]


def load_base(source: str) -> LoadedModel:
    """A model to train from or distil from, in its plain (unfused) form."""
    import omni_model

    return omni_model.load(source, fuse=False)


def dataset(sources: str | Path | Sequence[str | Path], base: LoadedModel, cache: Path, *,
            on_progress: Progress | None = None, max_documents: int | None = None) -> TokenDataset:  # fmt: skip
    """The token dataset of `sources` under the base's tokenizer, cached per tokenizer in `cache`."""
    from omni_train.data import tokenizer_sha256

    folder = Path(cache) / f"tokens-{tokenizer_sha256(base.tokenizer)[:16]}"
    if rank() == 0:  # one process builds; under torchrun the others then find it built
        TokenDataset.build(
            sources, base.tokenizer, folder, on_progress=on_progress, max_documents=max_documents
        )
    barrier()
    return TokenDataset.build(sources, base.tokenizer, folder, max_documents=max_documents)


def _identity(
    kind: str, base: LoadedModel | None, cfg: ModelConfig, data: TokenDataset, **extra: Any
) -> dict:
    from omni_model.native import config_to_dict

    return {"recipe": kind, "base": None if base is None else base.source, "model": config_to_dict(cfg),
            "data": data.manifest.get("key"), **extra}  # fmt: skip


def _check_vocab(cfg: ModelConfig, data: TokenDataset, what: str) -> None:
    if cfg.vocab_size < data.vocab_size:
        raise TrainError(
            f"{what} has a vocabulary of {cfg.vocab_size}; the dataset's tokenizer has {data.vocab_size}"
        )


def student(preset: str, teacher: LoadedModel, seed: int) -> torch.nn.Module:
    from omni_model.decoder import Decoder

    torch.manual_seed(seed)
    return Decoder(student_config(preset, teacher.config))


def pretrain(preset: str, base: LoadedModel, data: TokenDataset, cfg: TrainConfig, out: Path, *,
             resume: bool = False, on_event: Callable[[Event], None] | None = None) -> TrainResult:  # fmt: skip
    """The student preset trained from random weights on the data alone (the baseline for distill)."""
    model = student(preset, base, cfg.seed)
    _check_vocab(model.config, data, f"student {preset}")
    result = train(model, LMObjective(), data.train, data.val, cfg, out, resume=resume,
                   identity=_identity("pretrain", None, model.config, data, preset=preset), on_event=on_event)  # fmt: skip
    _save(model, base, out, {"recipe": "pretrain", "preset": preset, "train": asdict(cfg)})
    return result


def distill(preset: str, teacher: LoadedModel, data: TokenDataset, cfg: TrainConfig, out: Path, *,
            temperature: float = 1.0, alpha: float = 0.5, cache_k: int | None = None, inherit: bool = True,
            resume: bool = False, on_event: Callable[[Event], None] | None = None,
            on_progress: Progress | None = None) -> TrainResult:  # fmt: skip
    """The student preset trained on the teacher's softened distribution and the data. With `cache_k`,
    the teacher's top-k logits of every training window are computed once into a cache beside the
    dataset (reused by later runs) and training reads them instead of running the teacher. `inherit`:
    the student's embedding starts from the teacher's (recipes.inherit_embeddings)."""
    model = student(preset, teacher, cfg.seed)
    if model.config.vocab_size != teacher.config.vocab_size:
        raise TrainError(f"the student's vocabulary ({model.config.vocab_size}) differs from the teacher's "
                         f"({teacher.config.vocab_size})")  # fmt: skip
    if inherit:
        inherit_embeddings(model, teacher.model)
    _check_vocab(model.config, data, f"student {preset}")
    if cache_k is None:
        obj: Any = DistillObjective(teacher.model, temperature=temperature, alpha=alpha)
    else:
        cache = teacher_cache(teacher, data, cfg.seq_len, cache_k, temperature, on_progress=on_progress)
        obj = CachedDistillObjective(cache, teacher.config.vocab_size, temperature=temperature, alpha=alpha)
    ident = _identity("distill", teacher, model.config, data, preset=preset, temperature=temperature, alpha=alpha,
                      cache_k=cache_k, inherit=inherit)  # fmt: skip
    result = train(
        model, obj, data.train, data.val, cfg, out, resume=resume, identity=ident, on_event=on_event
    )
    _save(model, teacher, out, {"recipe": "distill", "teacher": teacher.source, "preset": preset,
                                "temperature": temperature, "alpha": alpha, "cache_k": cache_k, "inherit": inherit,
                                "train": asdict(cfg)})  # fmt: skip
    return result


def teacher_cache(teacher: LoadedModel, data: TokenDataset, seq_len: int, k: int, temperature: float = 1.0, *,
                  on_progress: Progress | None = None) -> Any:  # fmt: skip
    """The teacher's top-k logits over the dataset's training windows, kept beside the dataset."""
    from omni_train.teacher_cache import TeacherCache

    tid = f"{teacher.source}@{source_sha256(teacher.source) or 'folder'}"
    folder = (
        data.folder.parent
        / f"{data.folder.name}-teacher-{hashlib.sha256(tid.encode()).hexdigest()[:12]}-s{seq_len}-k{k}-t{temperature:g}"
    )
    if rank() == 0:
        built = TeacherCache.build(teacher.model, data.train, folder, seq_len=seq_len, k=k, teacher_id=tid,
                                   temperature=temperature, on_progress=on_progress)  # fmt: skip
    barrier()
    if rank() == 0:
        return built
    from omni_train.teacher_cache import tokens_sha256

    windows = (len(data.train) - 1) // seq_len
    return TeacherCache.open(folder, {"teacher": tid, "tokens": tokens_sha256(data.train), "seq_len": seq_len,
                                      "k": k, "temperature": float(temperature), "windows": windows})  # fmt: skip


def moe(base: LoadedModel, data: TokenDataset, cfg: TrainConfig, out: Path, *, n_experts: int, top_k: int,
        method: str = "copy", resume: bool = False, on_event: Callable[[Event], None] | None = None) -> TrainResult:  # fmt: skip
    """Continued training of the base upcycled to a mixture of experts (omni-moe); the per-expert load
    of every step is in metrics.jsonl."""
    from omni_model.upcycle import upcycle

    model = upcycle(base.model, n_experts=n_experts, top_k=top_k, method=method)
    _check_vocab(model.config, data, base.source)
    ident = _identity("moe", base, model.config, data, n_experts=n_experts, top_k=top_k, method=method)
    result = train(model, LMObjective(), data.train, data.val, cfg, out, resume=resume, identity=ident,
                   on_event=on_event)  # fmt: skip
    _save(model, base, out, {"recipe": "moe", "base": base.source, "method": method, "train": asdict(cfg)})
    return result


def lora(base: LoadedModel, data: TokenDataset, cfg: TrainConfig, out: Path, lora_cfg: Any, *,
         resume: bool = False, on_event: Callable[[Event], None] | None = None) -> TrainResult:  # fmt: skip
    """LoRA adapters on the frozen base, saved on their own in out/adapters."""
    from omni_train.lora import apply_lora, save_adapters

    names = apply_lora(base.model, lora_cfg)
    _check_vocab(base.config, data, base.source)
    ident = _identity("lora", base, base.config, data, lora=asdict(lora_cfg), targets=names)
    result = train(base.model, LMObjective(), data.train, data.val, cfg, out, resume=resume, identity=ident,
                   on_event=on_event)  # fmt: skip
    save_adapters(
        base.model, lora_cfg, out / "adapters", base=base.source, base_sha256=source_sha256(base.source)
    )
    return result


def _json_or_none(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None


def source_sha256(source: str) -> str | None:
    """sha256 of a model file (GGUF or a zoo name's file); None for a folder."""
    from omni_model.loader import resolve_source

    path = resolve_source(source)
    if not path.is_file():
        return None
    from omni_model.files import file_sha256

    return file_sha256(path)


def _save(model: torch.nn.Module, base: LoadedModel, out: Path, meta: dict[str, Any]) -> None:
    import omni_model

    if rank() == 0:
        omni_model.save(model, out / "model", tokenizer=base.tokenizer, meta=meta)
    barrier()


def heads(base: LoadedModel, data: TokenDataset, cfg: TrainConfig, out: Path, heads_cfg: Any, *,
          prompts: int = 256, prompt_len: int = 32, new_tokens: int = 96, soft: bool = False, chat: bool = False,
          draft_vocab: int | None = None,
          resume: bool = False, on_event: Callable[[Event], None] | None = None,
          on_progress: Progress | None = None) -> TrainResult:  # fmt: skip
    """Medusa-style heads on the frozen base, trained on the base's own greedy continuations of prompts
    drawn from the data (kept in out/continuations.npy, so a resumed run trains on the same stream);
    validated on the real text of the validation split. The heads go to out/heads. `chat`: the prompts
    are requests about passages of the data in the base's chat template (omni_train.heads.chat_prompts),
    so the heads learn the base's answers. `draft_vocab`: the heads score only the tokens the base produced
    most often in the stream (FR-Spec's frequency-ranked set), in training and when drafting."""
    import numpy as np

    from omni_model.medusa import top_tokens
    from omni_train.heads import (
        HeadedModel,
        HeadsObjective,
        MedusaHeads,
        chat_prompts,
        greedy_continuations,
        sample_prompts,
        save_heads,
    )

    _check_vocab(base.config, data, base.source)
    stream_path, stream_meta = out / "continuations.npy", out / "continuations.json"
    # The stream is the base's answers to these prompts: reused when the folder holds one made the same way.
    made_by = {"base": base.source, "base_sha256": source_sha256(base.source), "tokens": data.manifest.get("key"),
               "prompts": prompts, "prompt_len": prompt_len, "new_tokens": new_tokens, "chat": chat, "seed": cfg.seed}  # fmt: skip
    same = stream_path.is_file() and stream_meta.is_file() and _json_or_none(stream_meta) == made_by
    if (
        not (resume and stream_path.is_file()) and not same and rank() == 0
    ):  # the others read what rank 0 wrote
        if chat:
            groups = chat_prompts(base.tokenizer, data.train, prompts, prompt_len, seed=cfg.seed)
        else:
            groups = [sample_prompts(data.train, prompts, prompt_len, seed=cfg.seed)]
        stream = np.concatenate([greedy_continuations(base.model, p, new_tokens, batch_size=32, on_progress=on_progress)
                                 for p in groups])  # fmt: skip
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / ".continuations.tmp.npy"
        np.save(tmp, stream)
        stream_meta.unlink(missing_ok=True)
        tmp.replace(stream_path)
        stream_meta.write_text(json.dumps(made_by, indent=1))
    barrier()
    stream = np.load(stream_path, allow_pickle=False)
    torch.manual_seed(cfg.seed)
    h = MedusaHeads(base.config.dim, heads_cfg)
    counts = np.bincount(stream, minlength=base.config.vocab_size)
    vocab = None
    if draft_vocab is not None:
        if not 1 <= draft_vocab <= base.config.vocab_size:
            raise TrainError(f"draft_vocab must be in 1..{base.config.vocab_size}, got {draft_vocab}")
        vocab = torch.from_numpy(top_tokens(counts, draft_vocab))
    ident = _identity("heads", base, base.config, data, heads=asdict(heads_cfg), soft=soft, prompts=prompts,
                      prompt_len=prompt_len, new_tokens=new_tokens, chat=chat,
                      draft_vocab=draft_vocab)  # fmt: skip
    result = train(HeadedModel(base.model, h, vocab), HeadsObjective(soft=soft), stream, data.val, cfg, out,
                   resume=resume, identity=ident, on_event=on_event)  # fmt: skip
    if rank() == 0:
        save_heads(h, heads_cfg, out / "heads", base=base.source, base_sha256=source_sha256(base.source),
                   base_dim=base.config.dim, vocab_size=base.config.vocab_size,
                   token_counts=counts, draft_vocab=draft_vocab)  # fmt: skip
    barrier()
    return result
