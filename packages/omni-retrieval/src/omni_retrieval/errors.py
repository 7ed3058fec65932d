"""The typed error of omni-retrieval: one line naming the file or value and what is wrong."""

from omni_model.errors import OmniError


class RetrievalError(OmniError):
    """Bad input to an index: empty sources, wrong dimensions, corrupt files, impossible budgets."""
