"""Typed errors of the export: each carries a one-line message naming the input and what is wrong."""

from omni_model.errors import OmniError


class ExportError(OmniError):
    """The model or the options cannot be exported as asked."""


class UnsupportedExportError(ExportError):
    """The architecture or weight format is not (yet) supported by the ONNX export."""
