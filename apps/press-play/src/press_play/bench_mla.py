"""Latent attention figures for BENCHMARKS.md: KV-cache bytes per token, and absorbed versus naive
decoding over a long cache.

KV bytes per token come from the cache objects omni-kv allocates for each config (and agree with
`ModelConfig.kv_bytes_per_token`): latent attention (MLA) against the grouped-query or multi-head
attention the same shape would otherwise cache. Configs are full-size shapes; only one token's
worth of cache is allocated.

Decode speed: a decoder with DeepSeek-V2-Lite's attention (2048 wide, 16 heads, latent 512 + 64,
no query low-rank) and a few layers, random weights (speed does not depend on their values),
float32. The cache is filled with `cached_tokens` tokens once; then each mode decodes
`decode_tokens` steps from there and rolls back, alternating naive and absorbed over the rounds.
Naive re-expands every cached latent into per-head keys and values at each step; absorbed attends
over the latents directly.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from omni_kv import DenseKVCache, LatentKVCache
from omni_model.config import MLAConfig, ModelConfig
from omni_model.decoder import Decoder
from omni_model.fused import fuse_for_inference

SECTION = "mla"
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class KVShape:
    name: str
    n_layers: int
    n_heads: int
    n_kv_heads: int  # the grouped-query alternative
    head_dim: int  # its key/value head size
    mla: MLAConfig
    note: str


KV_SHAPES = (
    KVShape("DeepSeek-V3 (671B)", 61, 128, 128, 0, MLAConfig(512, 128, 64, 128, q_lora_rank=1536),
            "without MLA: 128 heads caching 192-dim keys and 128-dim values (multi-head)"),
    KVShape("DeepSeek-V3 (671B)", 61, 128, 8, 128, MLAConfig(512, 128, 64, 128, q_lora_rank=1536),
            "without MLA: 8 kv heads of 128 (a Llama-3-style GQA)"),
    KVShape("SmolLM2-135M", 30, 9, 3, 64, MLAConfig(256, 64, 32, 64),
            "GQA as shipped (3 kv heads of 64); MLA with DeepSeek's ratios (latent 4x head, rope head/2)"),
    KVShape("SmolLM2-135M", 30, 9, 3, 64, MLAConfig(128, 64, 32, 64),
            "GQA as shipped; MLA with a latent of 2x head"),
)  # fmt: skip


@dataclass(frozen=True)
class MLABenchConfig:
    cached_tokens: int = 2048
    decode_tokens: int = 16
    rounds: int = 5
    threads: int = 2
    n_layers: int = 4
    vocab_size: int = 32000

    def __post_init__(self) -> None:
        for name in ("cached_tokens", "decode_tokens", "rounds", "threads", "n_layers", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"MLABenchConfig.{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def quick_config(cls, **overrides) -> MLABenchConfig:
        return cls(**{"cached_tokens": 256, "decode_tokens": 4, "rounds": 1, "n_layers": 1, "vocab_size": 1024,
                      **overrides})  # fmt: skip

    @property
    def command(self) -> str:
        """The options that reproduce this run, with a leading space."""
        quick = self == MLABenchConfig.quick_config(rounds=self.rounds, threads=self.threads)
        args = [" --quick"] if quick else []
        default = MLABenchConfig.quick_config() if quick else MLABenchConfig()
        args += [
            f" --{k} {getattr(self, k)}"
            for k in ("rounds", "threads")
            if getattr(self, k) != getattr(default, k)
        ]
        return "".join(args)


@dataclass
class KVRow:
    shape: KVShape
    gqa_bytes: int  # per token, all layers, float16
    mla_bytes: int


@dataclass
class MLAReport:
    config: MLABenchConfig
    machine: dict
    kv_rows: list[KVRow]
    tok_s: dict[str, list[float]] = field(default_factory=dict)  # mode -> one value per round
    max_logit_diff: float = 0.0  # absorbed against naive over the decoded steps

    def median(self, mode: str) -> float:
        return statistics.median(self.tok_s[mode])


def kv_rows() -> list[KVRow]:
    rows = []
    for s in KV_SHAPES:
        if s.head_dim:  # grouped-query: k and v of head_dim per kv head
            gqa = DenseKVCache(s.n_layers, s.n_kv_heads, s.head_dim, max_len=1, dtype=torch.float16)
        else:  # multi-head without compression: MLA's own key and value sizes per head
            gqa = DenseKVCache(s.n_layers, s.n_heads, s.mla.qk_head_dim, v_head_dim=s.mla.v_head_dim,
                               max_len=1, dtype=torch.float16)  # fmt: skip
        mla = LatentKVCache(
            s.n_layers, s.mla.kv_lora_rank, s.mla.qk_rope_head_dim, max_len=1, dtype=torch.float16
        )
        rows.append(KVRow(s, gqa.bytes_per_token(), mla.bytes_per_token()))
    return rows


def decode_model(config: MLABenchConfig) -> Decoder:
    """DeepSeek-V2-Lite's attention shape with a small dense feed-forward, random weights, in the
    inference form `omni_model.load` returns."""
    cfg = ModelConfig(
        vocab_size=config.vocab_size, dim=2048, n_layers=config.n_layers, n_heads=16, n_kv_heads=16, ffn_dim=1408,
        head_dim=192, max_seq_len=config.cached_tokens + config.decode_tokens,
        mla=MLAConfig(kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128),
    )  # fmt: skip
    torch.manual_seed(0)
    return fuse_for_inference(Decoder(cfg))


@torch.inference_mode()
def run_mla_bench(config: MLABenchConfig, on_progress: Progress | None = None) -> MLAReport:
    report_progress = on_progress or (lambda what, done, total: None)
    total = 2 + 2 * config.rounds
    report_progress("MLA: KV bytes per token", 0, total)
    from press_play.bench import machine_info

    report = MLAReport(config, machine_info(config.threads), kv_rows(), {"naive": [], "absorbed": []})
    torch.set_num_threads(config.threads)
    model = decode_model(config)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, model.config.vocab_size, (1, config.cached_tokens), generator=g)
    steps = torch.randint(0, model.config.vocab_size, (1, config.decode_tokens), generator=g)
    report_progress(f"MLA: filling the cache with {config.cached_tokens} tokens", 1, total)
    cache = model.make_cache(max_len=config.cached_tokens + config.decode_tokens)
    model.set_attention_mode("naive")
    for start in range(0, config.cached_tokens, 512):  # chunks bound the prefill's attention matrix
        model(prompt[:, start : start + 512], cache=cache, last_only=True)
    logits: dict[str, torch.Tensor] = {}
    done = 2
    for r in range(config.rounds):
        for mode in ("naive", "absorbed") if r % 2 == 0 else ("absorbed", "naive"):
            report_progress(f"MLA: {mode} decode, round {r + 1}/{config.rounds}", done, total)
            model.set_attention_mode(mode)
            model(steps[:, :1], cache=cache)  # warm-up step, not timed
            cache.rollback(1)
            out = []
            t0 = time.perf_counter()
            for i in range(config.decode_tokens):
                out.append(model(steps[:, i : i + 1], cache=cache))
            report.tok_s[mode].append(config.decode_tokens / (time.perf_counter() - t0))
            cache.rollback(config.decode_tokens)
            logits[mode] = torch.cat(out, dim=1)
            done += 1
    report.max_logit_diff = (logits["naive"] - logits["absorbed"]).abs().max().item()
    report_progress("MLA: done", total, total)
    return report


def render_mla_section(report: MLAReport) -> str:
    c, machine, command = report.config, report.machine, report.config.command
    spread = c.rounds > 1
    lines = [
        f"<!-- bench:{SECTION}:start -->",
        "## Multi-head Latent Attention: cache size and absorbed decoding",
        "",
        "### KV-cache bytes per token (all layers, float16)",
        "",
        "From the caches omni-kv allocates for each shape (`DenseKVCache` / `LatentKVCache`.bytes_per_token()). "
        "MLA caches one normalised latent plus the rotary key shared by all heads; the alternative caches keys "
        "and values per kv head.",
        "",
        "| model shape | alternative | MLA latent + rope | alternative bytes/token | MLA bytes/token | ratio |",
        "|---|---|---|---:|---:|---:|",
    ]
    for row in report.kv_rows:
        s = row.shape
        lines.append(
            f"| {s.name}, {s.n_layers} layers | {s.note} | {s.mla.kv_lora_rank} + {s.mla.qk_rope_head_dim} | "
            f"{row.gqa_bytes:,} | {row.mla_bytes:,} | {row.gqa_bytes / row.mla_bytes:.1f}x smaller |"
        )

    def cell(mode: str) -> str:
        v = report.tok_s[mode]
        return f"{statistics.median(v):,.1f} ({min(v):,.1f}–{max(v):,.1f})" if spread else f"{v[0]:,.1f}"

    ratio = report.median("absorbed") / report.median("naive")
    lines += [
        "",
        f"### Absorbed versus naive decoding at {c.cached_tokens:,} cached tokens",
        "",
        f"A {c.n_layers}-layer decoder with DeepSeek-V2-Lite's attention (width 2048, 16 heads, latent 512 + 64 "
        "rope, 128-dim no-position query/key and value heads, no query low-rank), a 1408-wide dense SwiGLU and "
        f"a {c.vocab_size:,} vocabulary; random weights, float32, the inference form (`omni_model.fused`), {machine['threads']} threads. The cache is filled once "
        f"with {c.cached_tokens:,} tokens; each mode then decodes {c.decode_tokens} tokens (after one untimed "
        f"step) and rolls them back; modes alternate over {c.rounds} round(s); cells are the median (min–max).",
        "",
        f"- Machine: {machine['cpu']}, {machine['cores']} cores; Python {machine['python']}, "
        f"torch {machine['torch']}; {machine['date']}",
        f"- Command: `just bench --suite mla{command}` (= `uv run python -m press_play.bench --suite mla{command}`)",
        "",
        "| mode | what each decode step does | decode tok/s | ratio |",
        "|---|---|---:|---:|",
        f"| naive | expand all {c.cached_tokens:,} latents to per-head keys/values, then attend | {cell('naive')} | 1.00x |",
        f"| absorbed | attend over the latents; key/value up-projections folded into query and output "
        f"| {cell('absorbed')} | {ratio:.2f}x |",
        "",
        f"Both modes give the same logits: max |difference| over the decoded steps {report.max_logit_diff:.1e}. "
        f"Per decoded token, naive re-expands {c.cached_tokens:,} x 512 latents into 16 x 256 keys/values per layer "
        f"({c.cached_tokens * 512 * 16 * 256 * 2 / 1e9:.1f} GFLOP); absorbed reads them once.",
        f"<!-- bench:{SECTION}:end -->",
        "",
    ]
    return "\n".join(lines)
