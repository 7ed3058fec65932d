"""Loading under a timeout, and the one-line typed error every bad checkpoint must give."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

import omni_model
from omni_model import OmniError

TIMEOUT_S = 10.0


def load_within(source: str | Path, seconds: float = TIMEOUT_S) -> omni_model.LoadedModel:
    """omni_model.load on a daemon thread: a hang fails the test and cannot keep the process alive."""
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["model"] = omni_model.load(source)
        except BaseException as e:  # handed to the test thread, which judges it
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"load({source}) still running after {seconds:.0f} s")
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    return out["model"]  # type: ignore[return-value]


def bad(exc_type: type[OmniError], source: str | Path, *names: object) -> str:
    """Check that load(source) raises exactly `exc_type` with a one-line message naming each of `names`."""
    with pytest.raises(OmniError) as info:
        load_within(source)
    err = info.value
    assert type(err) is exc_type, f"{type(err).__name__}: {err}"
    msg = str(err)
    assert msg and "\n" not in msg and "\r" not in msg, repr(msg)
    for name in names or (source,):
        assert str(name) in msg, f"{name} not in {msg!r}"
    return msg
