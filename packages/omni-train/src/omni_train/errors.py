"""The typed error of omni-train: one line naming the input and what is wrong."""

from omni_model.errors import OmniError


class TrainError(OmniError):
    """Bad input to training: budgets, datasets, configs, checkpoints that do not match the run."""
