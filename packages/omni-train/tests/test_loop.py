"""The loop: bit-for-bit resume after an interrupt, a clean stop at the budget, the plan written first,
MoE bias balancing, and data parallelism over two torchrun processes equal to one process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from omni_model.config import ModelConfig
from omni_model.decoder import Decoder
from omni_moe import MoEConfig
from omni_train import TrainConfig, TrainError, train
from omni_train.recipes import LMObjective

HERE = Path(__file__).parent


def tiny(moe: bool = False, seed: int = 0) -> Decoder:
    torch.manual_seed(seed)
    m = (
        MoEConfig(n_experts=4, top_k=2, expert_dim=32, router="sigmoid", score_correction_bias=True)
        if moe
        else None
    )
    cfg = ModelConfig(
        vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64, moe=m
    )
    return Decoder(cfg)


def tokens(n: int = 6000, seed: int = 0) -> np.ndarray:
    """A learnable stream: a noisy counter mod 64."""
    rng = np.random.default_rng(seed)
    return ((np.arange(n) + (rng.random(n) < 0.1) * rng.integers(0, 64, n)) % 64).astype(np.uint16)


CFG = TrainConfig(
    seq_len=16, batch_size=4, grad_accum=2, steps=8, warmup=2, eval_every=3, eval_batches=2, lr=3e-3
)


def test_interrupted_run_resumes_bit_for_bit(tmp_path):
    data, val = tokens(), tokens(800, 1)
    straight = tiny()
    r1 = train(straight, LMObjective(), data, val, CFG, tmp_path / "a")
    assert r1.steps == 8 and r1.stopped == "steps"

    def interrupt(e):
        if e.kind == "step" and e.step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends: finish the step, checkpoint, return

    part = tiny()
    r2 = train(part, LMObjective(), data, val, CFG, tmp_path / "b", on_event=interrupt)
    assert r2.stopped == "interrupted" and r2.steps == 3
    resumed = tiny(seed=1)  # different initial weights: everything must come from the checkpoint
    r3 = train(resumed, LMObjective(), data, val, CFG, tmp_path / "b", resume=True)
    assert r3.steps == 8
    for (n, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    rows = [json.loads(r) for r in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(r) for r in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    losses = lambda rs: [r["loss"] for r in rs if "loss" in r]  # noqa: E731
    assert losses(rows) == losses(rows_b)
    assert rows[-1]["final"] and rows[-1]["val_ppl"] < 64  # learned something: below uniform


def test_budget_ends_with_a_checkpoint_and_an_evaluation(tmp_path):
    cfg = TrainConfig(seq_len=16, batch_size=4, budget_s=4.0, eval_every=50, eval_batches=2)
    events = []
    r = train(tiny(), LMObjective(), tokens(), tokens(800, 1), cfg, tmp_path / "run", on_event=events.append)
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())["plan"]
    assert events[0].kind == "plan" and plan["steps"] >= 1 and plan["expected_s"] <= 4.0
    assert r.stopped in ("steps", "budget") and r.elapsed_s < 4.0 * 1.5
    assert (r.checkpoint / "state.json").is_file() and "val_ppl" in r.metrics


def test_moe_bias_moves_toward_balance_and_load_is_logged(tmp_path):
    model = tiny(moe=True)
    cfg = TrainConfig(seq_len=16, batch_size=4, steps=5, eval_every=10, eval_batches=1, balance_rate=0.01)
    train(model, LMObjective(), tokens(), tokens(800, 1), cfg, tmp_path / "run")
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    load = rows[0]["expert_load"]
    assert len(load) == 2 and sum(load[0]) == 4 * 16 * 2  # tokens x top-2 per MoE layer
    biases = [m.gate.e_score_correction_bias for m in model.modules() if hasattr(m, "gate")]
    assert all(b.abs().sum() > 0 for b in biases)


def test_bad_input_is_one_line(tmp_path):
    for kw, msg in (
        ({"budget_s": 0}, "budget must be positive"),
        ({"steps": None}, "steps or a time budget"),
        ({"steps": 2, "batch_size": 0}, "batch_size"),
    ):
        with pytest.raises(TrainError, match=msg):
            TrainConfig(**kw)
    with pytest.raises(TrainError, match=r"no state\.json"):
        train(tiny(), LMObjective(), tokens(), tokens(800, 1), CFG, tmp_path / "x", resume=True)
    train(tiny(), LMObjective(), tokens(), tokens(800, 1), CFG, tmp_path / "r")
    other = TrainConfig(seq_len=16, batch_size=4, grad_accum=2, steps=8, lr=1e-2)
    with pytest.raises(TrainError, match="another run") as e:
        train(tiny(), LMObjective(), tokens(), tokens(800, 1), other, tmp_path / "r", resume=True)
    assert "\n" not in str(e.value)
    with pytest.raises(TrainError, match="fewer than one"):
        train(tiny(), LMObjective(), tokens(), tokens(10, 1), CFG, tmp_path / "v")


def test_two_torchrun_processes_equal_one_process(tmp_path):
    """DDP over gloo with 2 x batch 4 ends with the weights of one process with batch 8."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    assert torchrun, "torchrun ships with torch"
    script = HERE / "ddp_worker.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", str(script), str(tmp_path / "ddp"), "4"],
                   check=True, env=env, capture_output=True, timeout=300)  # fmt: skip
    subprocess.run([sys.executable, str(script), str(tmp_path / "one"), "8"], check=True, env=env,
                   capture_output=True, timeout=300)  # fmt: skip
    a, b = (
        load_file(str(tmp_path / "ddp" / "final.safetensors")),
        load_file(str(tmp_path / "one" / "final.safetensors")),
    )
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=2e-5, msg=n)
    assert not torch.equal(a["embed_tokens.weight"], tiny().embed_tokens.weight.detach())  # it trained
