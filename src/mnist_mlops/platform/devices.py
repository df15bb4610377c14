"""The devices: how many GPUs there are, which one a serving worker takes, and which
distribution strategy training uses. Scale-out is configuration: the devices choose.

No TensorFlow at import: `gpu_count` asks NVML, the others import TensorFlow when called.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("mnist_mlops.platform.devices")


def gpu_count() -> int:
    """NVIDIA GPUs visible to this machine, without importing TensorFlow (0 on failure).

    NVML (nvidia-ml-py, a BentoML dependency) is what BentoML itself asks; no driver → 0.
    """
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no NVML library or driver: no GPU
        return 0


def configure_tensorflow() -> str:
    """GPU: this worker's own GPU with memory growth on. CPU: as is. Returns the device used."""
    import bentoml
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "cpu"
    index = ((bentoml.server_context.worker_index or 1) - 1) % len(gpus)
    try:
        tf.config.set_visible_devices(gpus[index], "GPU")
        tf.config.experimental.set_memory_growth(gpus[index], True)
    except RuntimeError as exc:  # already initialised (e.g. in-process tests): keep going
        logger.warning("GPU configuration skipped: %s", exc)
    return f"gpu:{index}"


def pick_strategy():
    """Several GPUs → MirroredStrategy, one GPU → that GPU, none → the default (CPU)."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy()
    if len(gpus) == 1:
        return tf.distribute.OneDeviceStrategy("/gpu:0")
    return tf.distribute.get_strategy()
