"""GPU check: train on the sample and serve a batch on an NVIDIA GPU, and prove the GPU did it.

    python benchmarks/gpu_check.py [--epochs 1] [--batch 1024] [--set section.key=value]

1. Exits 1 with a clear message when TensorFlow sees no GPU.
2. Trains `--epochs` epochs of the pipeline's own training step
   (`mnist_mlops.training.train.fit(params, paths)`: tf.data, the distribution strategy it picks
   for the devices present, the per-epoch MLflow callback into a temp sqlite store) on the
   offline sample, with params.yaml's defaults.
3. Runs batched inference through the path the BentoML service compiles
   (`mnist_mlops.serving.service.MnistClassifier`: `platform.devices.configure_tensorflow()`, then one
   `tf.function` with input signature [None, 28, 28, 1] around `model(x, training=False)`).
4. Prints images/s for both, and where the work ran: the device of the model's variables
   and of the output tensor, and the GPU memory TensorFlow allocated (must be > 0).

Exit 0 only when the GPU was used for both. Not a test.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, prepared_root, print_table  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1024, help="digits per inference batch")
    parser.add_argument("--seconds", type=float, default=5.0, help="inference timing window")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=value")
    args = parser.parse_args()

    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        import shutil
        import subprocess

        smi = shutil.which("nvidia-smi")
        seen = subprocess.run([smi, "-L"], capture_output=True, text=True).stdout.strip() if smi else ""
        hint = (f"nvidia-smi sees {seen.splitlines()[0]!r}: install the CUDA wheels in this environment "
                "(uv pip install 'tensorflow[and-cuda]==2.21.0', as bentofile.yaml does)" if seen else
                "run it on a machine with an NVIDIA GPU and its driver")
        print("gpu_check: no GPU visible to TensorFlow (tf.config.list_physical_devices('GPU') is empty; "
              f"TF {tf.__version__}, built with CUDA: {tf.test.is_built_with_cuda()}): {hint}.", file=sys.stderr)
        return 1
    details = tf.config.experimental.get_device_details(gpus[0])
    print(f"GPUs: {[g.name for g in gpus]} ({details.get('device_name', '?')}, "
          f"compute capability {details.get('compute_capability', '?')})", file=sys.stderr)

    import mlflow
    import numpy as np

    from mnist_mlops.config import load_params
    from mnist_mlops.training.prepare import load_split
    from mnist_mlops.training.train import fit

    rows = []
    ok = True
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        root = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
        paths, sizes = prepared_root(root)
        params = load_params(REPO, [f"train.epochs={args.epochs}", *args.overrides])
        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
        mlflow.set_experiment("gpu-check")
        with mlflow.start_run():
            start = time.perf_counter()
            model, history = fit(params, paths)
            train_s = time.perf_counter() - start
        var_device = model.weights[0].value.device if hasattr(model.weights[0], "value") else "?"
        for row in history:
            rows.append([f"train epoch {row['epoch']}" + (" (incl. tracing)" if row["epoch"] == 1 else ""),
                         f"{sizes['train'] / row['seconds']:,.0f}", var_device])

        # The service's compiled inference path (see mnist_mlops.serving.service.MnistClassifier.__init__).
        from mnist_mlops.preprocess import INPUT_SHAPE

        try:
            from mnist_mlops.platform.devices import configure_tensorflow

            device = configure_tensorflow()
        except Exception as exc:  # noqa: BLE001 - service module needs a model tag at import
            device = f"(service import failed: {type(exc).__name__}: {exc})"

        @tf.function(input_signature=[tf.TensorSpec([None, *INPUT_SHAPE], tf.float32)], reduce_retracing=True)
        def forward(x):
            return model(x, training=False)

        test = load_split(paths.prepared, "test").x
        batch = test[np.arange(args.batch) % len(test)]
        out = forward(batch)
        out.numpy()
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < args.seconds:
            forward(batch).numpy()
            n += len(batch)
        infer_ips = n / (time.perf_counter() - start)
        rows.append([f"inference, batches of {args.batch} (tf.function)", f"{infer_ips:,.0f}", out.device])
        peak = tf.config.experimental.get_memory_info("GPU:0")["peak"]

    print_table(f"GPU check: {gpus[0].name}, service device '{device}', {train_s:.1f} s training",
                ["", "images/s", "device"], rows)
    print(f"GPU memory peak allocated by TensorFlow: {peak / 2**20:,.0f} MiB")
    for what, dev in (("model variables", var_device), ("inference output", out.device)):
        on_gpu = "GPU" in str(dev).upper()
        ok &= on_gpu
        print(f"{what}: {dev} -> {'GPU' if on_gpu else 'NOT on the GPU'}")
    ok &= peak > 0
    print("GPU used for training and serving: " + ("yes" if ok else "NO"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
