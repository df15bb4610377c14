"""Import heavy modules in a background thread while the process waits on something else.

The flow process sits idle while a DVC stage runs in its subprocess; when the champion gate
that follows will need TensorFlow (a new model to score), importing it meanwhile takes that
import (seconds, more on a busy machine) off the run's critical path. A failed import is
ignored here: the real import later reports it.
"""

from __future__ import annotations

import importlib
import threading


def in_background(*modules: str) -> threading.Thread:
    def load() -> None:
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - reported by the import that needs it
                return

    thread = threading.Thread(target=load, name="mnist-mlops-preload", daemon=True)
    thread.start()
    return thread
