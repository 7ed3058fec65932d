"""omni-train: time-budgeted training loops, distillation, LoRA and MTP heads, on torch.distributed.

`train(model, objective, train_tokens, val_tokens, config, out)` runs the loop (loop.py); objectives
and student presets are in recipes.py, token datasets in data.py, LoRA in lora.py.
"""

from omni_train.data import Batches, TokenDataset, val_batches
from omni_train.errors import TrainError
from omni_train.loop import Event, TrainConfig, TrainResult, train

__all__ = [
    "Batches",
    "Event",
    "TokenDataset",
    "TrainConfig",
    "TrainError",
    "TrainResult",
    "train",
    "val_batches",
]
