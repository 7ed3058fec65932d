"""LoRA on tiny decoders: identity at init, only adapters train, merge/unmerge/strip keep the logits,
save/load round-trips onto a fresh base, and bad configs, files and models give one-line TrainErrors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from omni_model_tests import tiny
from safetensors.torch import load_file, save_file

import omni_model
from omni_model.config import MLAConfig, ModelConfig
from omni_model.decoder import Decoder
from omni_model.layers import Linear
from omni_moe import MoEConfig
from omni_train.errors import TrainError
from omni_train.lora import (
    LoRAConfig,
    LoRALinear,
    adapters,
    apply_lora,
    load_adapters,
    lora_state_dict,
    merge_lora,
    save_adapters,
    strip_lora,
    unmerge_lora,
)

SHA = "ab" * 32


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "llama"
    tiny.save_tiny("llama", out)
    return out


def base(folder) -> torch.nn.Module:
    return omni_model.load(folder, fuse=False).model


def tokens(n: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, tiny.VOCAB, (2, n), generator=torch.Generator().manual_seed(seed))


def randomize(model: torch.nn.Module, seed: int = 1) -> None:
    """Non-zero B (and fresh A), as after training, so that the adapters change the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in adapters(model).values():
            m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) * 0.1)
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def one_line(err: pytest.ExceptionInfo, *parts: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg and all(p in msg for p in parts), msg


def test_identity_at_init_and_only_adapters_train(folder):
    model, x = base(folder), tokens()
    ref = logits(model, x)
    names = apply_lora(model, LoRAConfig())
    assert len(names) == 2 * 7 and "layers.1.mlp.down_proj" in names and "lm_head" not in names
    assert torch.equal(logits(model, x), ref)  # B = 0: exactly the base
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(trainable) == sorted(lora_state_dict(model))
    assert len(trainable) == 2 * len(names)


def test_training_lowers_loss_and_changes_only_adapters(folder):
    model, x = base(folder), tokens(24)
    apply_lora(model, LoRAConfig(rank=4, alpha=8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v) != k.endswith(("lora_A", "lora_B")), k


def test_merge_unmerge_and_strip(folder):
    model, x = base(folder), tokens()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoRAConfig())
    randomize(model)
    ref = logits(model, x)
    assert not torch.allclose(ref, logits(base(folder), x), atol=1e-3)  # the adapters matter
    merge_lora(model)
    merged = {k: v.clone() for k, v in model.state_dict().items()}
    assert torch.allclose(logits(model, x), ref, atol=1e-5)
    merge_lora(model)  # a no-op when merged
    assert all(torch.equal(v, merged[k]) for k, v in model.state_dict().items())
    unmerge_lora(model)
    q = model.layers[0].self_attn.q_proj
    assert isinstance(q, LoRALinear) and not q.merged
    assert torch.allclose(q.base.weight, weights["layers.0.self_attn.q_proj.weight"], atol=1e-6)
    assert torch.allclose(logits(model, x), ref, atol=1e-5)
    stripped = strip_lora(model)
    assert not adapters(stripped) and type(stripped.layers[0].self_attn.q_proj) is Linear
    assert stripped.state_dict().keys() == weights.keys()  # checkpoint names again, for export
    assert torch.allclose(logits(stripped, x), ref, atol=1e-5)


def test_save_load_round_trip(folder, tmp_path):
    model, x = base(folder), tokens()
    cfg = LoRAConfig(rank=4, alpha=12, targets=("self_attn.*_proj",))
    names = apply_lora(model, cfg)
    assert len(names) == 2 * 4
    randomize(model)
    ref = logits(model, x)
    out = save_adapters(model, cfg, tmp_path / "adapter", base=str(folder), base_sha256=SHA)
    meta = json.loads((out / "adapter.json").read_text())
    assert meta["targets"] == names and meta["base_sha256"] == SHA and meta["config"]["rank"] == 4
    assert save_adapters(model, cfg, out, base=str(folder), base_sha256=SHA) == out  # replaces its own
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temp folder left behind
    fresh = base(folder)
    assert load_adapters(fresh, out, base_sha256=SHA) == cfg
    assert torch.equal(logits(fresh, x), ref)
    wrapped = base(folder)  # adapters applied already: loaded into place
    apply_lora(wrapped, cfg)
    load_adapters(wrapped, out)
    assert torch.equal(logits(wrapped, x), ref)
    with pytest.raises(TrainError) as e:
        load_adapters(base(folder), out, base_sha256="cd" * 32)
    one_line(e, "adapter.json", SHA)
    (tmp_path / "other").mkdir()
    with pytest.raises(TrainError) as e:
        save_adapters(model, cfg, tmp_path / "other", base="x", base_sha256=None)
    one_line(e, "not a LoRA adapter folder")


@pytest.mark.parametrize(
    ("field", "value"),
    [("rank", 0), ("rank", 2.0), ("rank", True), ("alpha", 0), ("alpha", float("nan")), ("alpha", 10**400),
     ("dropout", 1.0), ("targets", "q_proj"), ("targets", ()), ("targets", ("",))],
)  # fmt: skip
def test_bad_config(field, value):
    with pytest.raises(TrainError) as e:
        LoRAConfig(**{field: value})
    one_line(e, f"LoRAConfig.{field}")


def test_bad_models(folder):
    with pytest.raises(TrainError) as e:
        apply_lora(base(folder), LoRAConfig(targets=("wq", "attn.w?")))
    one_line(e, "'wq'", "q_proj", "gate_proj")
    with pytest.raises(TrainError) as e:
        apply_lora(omni_model.load(folder).model, LoRAConfig())
    one_line(e, "fuse=False")
    model = base(folder)
    apply_lora(model, LoRAConfig())
    with pytest.raises(TrainError) as e:
        apply_lora(model, LoRAConfig())
    one_line(e, "already")
    with pytest.raises(TrainError) as e:
        merge_lora(base(folder))
    one_line(e, "no LoRA adapters")
    tied = Decoder(ModelConfig(vocab_size=32, dim=16, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=24,
                               tie_embeddings=True))  # fmt: skip
    with pytest.raises(TrainError) as e:
        apply_lora(tied, LoRAConfig(targets=("lm_head",)))
    one_line(e, "lm_head", "embed_tokens.weight")


def corrupt(folder, tmp_path, edit):
    """Saved adapters, edited by `edit(meta, tensors)`, then loaded into a fresh base."""
    model = base(folder)
    cfg = LoRAConfig(rank=2)
    apply_lora(model, cfg)
    out = save_adapters(model, cfg, tmp_path / "a", base="tiny", base_sha256=None)
    meta, tensors = json.loads((out / "adapter.json").read_text()), load_file(out / "adapter.safetensors")
    edit(meta, tensors)
    (out / "adapter.json").write_text(json.dumps(meta))
    save_file(tensors, out / "adapter.safetensors")
    fresh = base(folder)
    with pytest.raises(TrainError) as e:
        load_adapters(fresh, out)
    assert not adapters(fresh)  # a failed load leaves the model untouched
    return e


A = "layers.0.self_attn.q_proj.lora_A"


@pytest.mark.parametrize(
    ("edit", "parts"),
    [
        (lambda m, t: t.__setitem__(A, torch.zeros(2, 63)), [A, "(2, 63)", "(2, 64)"]),
        (lambda m, t: t.pop(A), ["missing tensor", A]),
        (lambda m, t: t.__setitem__("x.lora_A", torch.zeros(1)), ["unexpected tensor", "x.lora_A"]),
        (lambda m, t: t.__setitem__(A, torch.full((2, 64), float("inf"))), [A, "finite"]),
        (lambda m, t: m["config"].__setitem__("rank", "2"), ["LoRAConfig.rank", "'2'"]),
        (lambda m, t: m.__setitem__("config", [2]), ["'config' must be a JSON object"]),
        (lambda m, t: m.__setitem__("targets", m["targets"][1:]), ["the model also has", "q_proj"]),
        (lambda m, t: m.__setitem__("version", 9), ["version 9"]),
        (lambda m, t: m.__setitem__("base_sha256", 5), ["base_sha256"]),
    ],
)
def test_bad_adapter_files(folder, tmp_path, edit, parts):
    one_line(corrupt(folder, tmp_path, edit), *parts)


def test_unreadable_adapter_files(folder, tmp_path):
    model = base(folder)
    apply_lora(model, cfg := LoRAConfig(rank=2))
    out = save_adapters(model, cfg, tmp_path / "a", base="tiny", base_sha256=None)
    (out / "adapter.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(TrainError) as e:
        load_adapters(base(folder), out)
    one_line(e, "adapter.safetensors", "not a readable safetensors file")
    (out / "adapter.json").write_text("{")
    with pytest.raises(TrainError) as e:
        load_adapters(base(folder), out)
    one_line(e, "adapter.json", "not readable JSON")
    with pytest.raises(TrainError) as e:
        load_adapters(base(folder), tmp_path)
    one_line(e, "no adapter.json")


def test_mla_moe_decoder():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=48,
                      moe=MoEConfig(4, 2, 16, n_shared_experts=1, first_k_dense_replace=1),
                      mla=MLAConfig(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                                    q_lora_rank=12))  # fmt: skip
    model, x = Decoder(cfg).eval(), torch.randint(0, 64, (1, 10))
    names = apply_lora(model, LoRAConfig())
    attn = {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"}
    assert {n.rsplit(".", 1)[1] for n in names if ".self_attn." in n} == attn
    assert "layers.1.mlp.shared_experts.gate_proj" in names  # routed experts are stacked tensors: frozen
    assert not model.layers[1].mlp.experts.gate_up_proj.requires_grad
    randomize(model)
    model.set_attention_mode("naive")
    ref = logits(model, x)
    model.set_attention_mode("absorbed")  # reads kv_b_proj.weight: the adapted weight
    assert torch.allclose(logits(model, x), ref, atol=1e-5)
    merge_lora(model)
    assert torch.allclose(logits(model, x), ref, atol=1e-5)
