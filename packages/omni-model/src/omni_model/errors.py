"""Typed errors of omni-model. Every message names the input and what is wrong with it, in one line."""

from __future__ import annotations


class OmniError(Exception):
    """Base of every error OmniCoder raises for bad input; apps print it as one line and exit 1."""


class ConfigError(OmniError, ValueError):
    """A model configuration field is missing or out of range."""


class CheckpointError(OmniError):
    """A checkpoint file or folder is missing, unreadable, truncated or inconsistent with its config."""


class UnsupportedArchitectureError(CheckpointError):
    """The checkpoint is of an architecture omni-model does not implement."""


class TokenizerError(OmniError):
    """A tokenizer is missing or cannot be built from what the checkpoint carries."""


class TemplateError(OmniError):
    """A chat template failed to render (bad syntax, or it tried something the sandbox forbids)."""


class DataError(OmniError):
    """A text or corpus cannot be found, fetched or read."""


class GenerationError(OmniError, ValueError):
    """A prompt cannot be generated from (empty, or too long for the model's context)."""
