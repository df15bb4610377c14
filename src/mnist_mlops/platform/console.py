"""A quiet console: the native libraries' start-up chatter filtered out of stderr.

TensorFlow 2.21 logs through absl straight to file descriptor 2, and `TF_CPP_MIN_LOG_LEVEL`
no longer silences all of it: on a machine without a GPU every process that touches
TensorFlow prints `E0000 … cuda_platform.cc] failed call to cuInit … (303)`, absl's
`WARNING: All log messages before absl::InitializeLog()…` and `I0000 … cudart_stub.cc …`
lines, which read as errors to anyone but are the normal CPU path. `filter_native_stderr`
puts a pipe in front of fd 2 (so the DVC stage processes, which inherit it, are filtered
too) and drops exactly those lines; every other line, real warnings and errors included,
passes unchanged. `--verbose` skips the filter.
"""

from __future__ import annotations

import atexit
import os
import re
import sys
import threading

# absl's own line format: `E0000 00:00:1795777721.049573    6891 cuda_platform.cc:52] message`
_ABSL = re.compile(rb"^([IWE])\d{4} [\d:.]+\s+\d+ [\w.]+:\d+\] (.*)")
_BENIGN = re.compile(
    rb"failed call to cuInit|Could not find cuda drivers|Unable to register cu(DNN|FFT|BLAS) factory|"
    rb"computation placer already registered|TF-TRT Warning|oneDNN custom operations|"
    rb"cuda_(platform|executor|dnn|fft|blas)|cudart_stub|Unable to initialize backend 'cuda'")
_PREAMBLE = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
# MLflow's UI says this on every start; `mnist-mlops ui` binds 127.0.0.1 unless told otherwise.
_MLFLOW_LOCALHOST = b"[MLflow] Security middleware enabled with default settings (localhost-only)."

_installed = False


def is_noise(line: bytes) -> bool:
    """True for the known-harmless native lines: absl INFO lines, CUDA-absent notices, absl's preamble."""
    if line.rstrip(b"\r\n") == _PREAMBLE or line.startswith(_MLFLOW_LOCALHOST):
        return True
    match = _ABSL.match(line)
    return bool(match) and (match.group(1) == b"I" or bool(_BENIGN.search(match.group(2))))


def _may_be_noise(start: bytes) -> bool:
    """Could this unfinished line still turn out to be one `is_noise` drops?"""
    head = start[:len(_PREAMBLE)]
    return _PREAMBLE.startswith(head) or (head[:1] in (b"I", b"W", b"E") and head[1:5].isdigit() or len(head) < 5)


def _pump(read_fd: int, out_fd: int) -> None:
    with os.fdopen(read_fd, "rb", buffering=0) as pipe:
        pending = b""
        while chunk := pipe.read(65536):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            kept = b"".join(line + b"\n" for line in lines if not is_noise(line + b"\n"))
            if pending and not _may_be_noise(pending):  # progress bars redraw without a newline
                kept, pending = kept + pending, b""
            if kept:
                os.write(out_fd, kept)
        if pending and not is_noise(pending):
            os.write(out_fd, pending)


def filter_native_stderr() -> None:
    """Filter fd 2 of this process (and of the processes it starts) until it exits."""
    global _installed
    if _installed or os.environ.get("MNIST_MLOPS_VERBOSE"):
        return
    try:
        sys.stderr.flush()
        original = os.dup(2)
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 2)
        os.close(write_fd)
    except OSError:
        return  # no usable stderr: leave it alone
    os.set_inheritable(original, False)
    if os.isatty(original):
        os.environ.setdefault("FORCE_COLOR", "1")  # rich, Prefect: the terminal is still behind the pipe
    pump = threading.Thread(target=_pump, args=(read_fd, original), name="stderr-filter", daemon=True)
    pump.start()
    _installed = True

    def restore() -> None:
        """Give fd 2 back and let the pump drain what was written before exit."""
        try:
            sys.stderr.flush()
            os.dup2(original, 2)  # closes our end of the pipe: the pump sees EOF once children are done
        except OSError:
            return
        pump.join(timeout=2)

    atexit.register(restore)
