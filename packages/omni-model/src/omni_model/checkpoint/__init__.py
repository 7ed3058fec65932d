"""Checkpoint import: Hugging Face folders (config.json + safetensors) and GGUF files.

Both are untrusted input: nothing is unpickled, every size is checked against the file, and every
failure becomes a `CheckpointError` naming the file.
"""
