"""Run by test_loop under torchrun (2 processes) or plainly (1): train the tiny model, save the weights."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from test_loop import tiny, tokens

from omni_train import TrainConfig, train
from omni_train.recipes import LMObjective

out, batch = Path(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(1)
if "RANK" in __import__("os").environ:
    dist.init_process_group("gloo")
model = tiny(moe=True)
cfg = TrainConfig(seq_len=16, batch_size=batch, steps=6, warmup=2, eval_every=100, eval_batches=1, lr=3e-3)
train(model, LMObjective(), tokens(), tokens(800, 1), cfg, out)
if not dist.is_initialized() or dist.get_rank() == 0:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "final.safetensors"))
if dist.is_initialized():
    dist.destroy_process_group()
