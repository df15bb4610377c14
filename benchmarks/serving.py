"""Serving benchmark: the champion's Bento vs `mlflow models serve` vs the same stack with a no-op model.

One load generator for all (`wrk`, apt-get install wrk): 32 concurrent clients sending
one-digit JSON requests for a fixed time, then 256-digit requests against the Bento,
compared with batched inference in this process, as JSON and as raw bytes; one-digit Open
Inference Protocol requests beside /predict's. Prints a table; not a test.

    python benchmarks/serving.py [--project DIR] [--duration 20] [--connections 32]

The project (default: $MNIST_MLOPS_ROOT or the current directory) must have a champion
(`make run`); its Bento is built if missing. Targets (from the serving issue):
(a) ≥ 15× (b) in req/s with 0 errors, (a) ≥ 0.8 × (c), p99 (a) ≤ p99 (b) / 5,
256-digit requests ≥ 0.5 × in-process batched images/s; (OIP issue) 256 digits as raw bytes
≥ 0.8 × in-process, one-digit OIP within 10% of /predict.

Rollout (from the follow-the-champion issue; needs two registered versions): the same Bento
in follow mode (f, polling every serve.follow_seconds) under the same load, its throughput as
a ratio of pinned, measured before (a) and after (p) it (≥ 0.95, 0 errors); then, under
load, the champion alias is moved to another version and back: seconds from each move to the
first answer from the new version, and p99 over the swap vs steady state.

Prediction log (from the feedback issue): (n) is (a) with `serve.log_predictions` off; with
the log on, throughput ≥ 0.9 × (n) and p99 ≤ 1.2 × (n), in the same invocation.
`--only a,n` (or `a,f`) runs a subset: each server costs a start plus 2 × duration.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

BIN = Path(sys.executable).parent
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "BENTOML_DO_NOT_TRACK": "true",
         "DVC_NO_ANALYTICS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TF_CPP_MIN_LOG_LEVEL": "2"}
os.environ.update(QUIET)

LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "{content_type}"
local f = io.open(os.getenv("WRK_BODY"), "rb"); wrk.body = f:read("*a"); f:close()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(cmd: list[str], ready_url: str, env: dict, log: Path, timeout: float = 300):
    """Start a server in its own process group, wait for `ready_url`, always kill the group."""
    import httpx

    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"{cmd[0]} exited {proc.returncode}: see {log}\n{log.read_text()[-2000:]}")
            try:
                if httpx.get(ready_url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"{ready_url} not ready after {timeout} s: see {log}")
            time.sleep(0.5)
        yield
    finally:
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(wait)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue


def _seconds(text: str) -> float:
    value, unit = re.fullmatch(r"([0-9.]+)(us|ms|s|m)", text).groups()
    return float(value) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[unit]


def wrk(url: str, body: Path, script: Path, seconds: float, connections: int) -> dict:
    """Run wrk; return req/s, p50/p99 latency (s) and errors (non-2xx + socket errors)."""
    duration = f"{max(1, round(seconds))}s"  # wrk rejects fractional durations ("7.5s")
    cmd = ["wrk", "-t", str(min(2, connections)), "-c", str(connections), "-d", duration,
           "--timeout", "30s", "--latency", "-s", str(script), url]
    out = subprocess.run(cmd, env={**os.environ, "WRK_BODY": str(body)}, capture_output=True, text=True,
                         check=True, timeout=seconds + 60).stdout
    pct = dict(re.findall(r"^\s+(50|99)(?:\.0+)?%\s+(\S+)\s*$", out, re.M))
    if "50" not in pct or "99" not in pct:
        raise SystemExit(f"unexpected wrk output:\n{out}")
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors += sum(map(int, m.groups()))
    return {"rps": float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1)),
            "p50": _seconds(pct["50"]), "p99": _seconds(pct["99"]), "errors": errors,
            "requests": int(re.search(r"(\d+) requests in", out).group(1))}


def in_process_images_per_s(keras_file: str, batch: np.ndarray, seconds: float = 5.0) -> float:
    """The model alone: compiled batched inference, as the service runs it, in this process."""
    import keras
    import tensorflow as tf

    model = keras.models.load_model(keras_file, safe_mode=True, compile=False)
    forward = tf.function(lambda x: model(x, training=False),
                          input_signature=[tf.TensorSpec([None, 28, 28, 1], tf.float32)])
    forward(batch).numpy()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        forward(batch).numpy()
        n += len(batch)
    return n / (time.perf_counter() - start)


def rollout(url: str, body: Path, script: Path, connections: int, versions: tuple[str, str],
            seconds: float = 24) -> dict:
    """Under wrk load, move the champion alias to versions[1] and back to versions[0]; returns
    the seconds from each move to the first answer from the new version, and wrk's figures."""
    import threading

    import httpx
    import mlflow

    from mnist_mlops.config import CHAMPION_ALIAS, MODEL_NAME

    client = mlflow.MlflowClient()
    result: dict = {}
    load = threading.Thread(target=lambda: result.update(wrk=wrk(url, body, script, seconds, connections)))
    load.start()
    switch = []
    digit = {"images": json.loads(body.read_text())["images"]}
    with httpx.Client(timeout=60) as http:
        for version in (versions[1], versions[0]):
            time.sleep(4)
            client.set_registered_model_alias(MODEL_NAME, CHAMPION_ALIAS, version)
            moved = time.monotonic()
            while http.post(url, json=digit).json()[0]["model_version"] != version:
                if time.monotonic() - moved > 120:
                    raise SystemExit(f"no answer from v{version} within 120 s of the alias move")
                time.sleep(0.05)
            switch.append(time.monotonic() - moved)
    load.join()
    return result["wrk"] | {"switch_s": switch}


def litert_images_per_s(keras_file: str, batch: np.ndarray, seconds: float = 5.0) -> float:
    """The same model as the CPU worker runs it (mnist_mlops.litert), in this process."""
    import keras

    from mnist_mlops import litert

    forward = litert.Forward(litert.export(keras.models.load_model(keras_file, safe_mode=True, compile=False)))
    forward(batch)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        forward(batch)
        n += len(batch)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=None, help="project dir (default: the current one)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load per server")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--skip-mlflow", action="store_true", help="leave out `mlflow models serve`")
    parser.add_argument("--only", default="a,b,c,n,f", help="servers to run, of a,b,c,n,f (default: all)")
    args = parser.parse_args()
    only = set(args.only.split(","))
    if args.skip_mlflow:
        only.discard("b")
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install wrk")
    if args.project:
        os.environ["MNIST_MLOPS_ROOT"] = str(args.project.resolve())

    from mnist_mlops.config import MODEL_NAME, project_root, tracking_uri
    from mnist_mlops.errors import UserError
    from mnist_mlops.preprocess import normalize
    from mnist_mlops.serving.package import KERAS_FILE, package_champion

    root = project_root()
    os.environ.setdefault("MLFLOW_TRACKING_URI", tracking_uri(root))
    try:
        packaged = package_champion(root)
    except UserError as exc:
        raise SystemExit(f"error: {exc}") from None
    import bentoml

    keras_file = bentoml.models.get(packaged["model"]).path_of(KERAS_FILE)
    test_x = root / "artifacts" / "prepared" / "test_x.npy"
    x = np.load(test_x) if test_x.exists() else np.random.default_rng(0).random((1000, 28, 28, 1), np.float32)
    digits = np.rint(x[..., 0] * 255).astype(np.uint8)  # raw 0–255 pixels, the compact JSON form

    tmp = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    script = tmp / "post.lua"
    script.write_text(LUA.format(content_type="application/json"))
    raw_script = tmp / "post-raw.lua"
    raw_script.write_text(LUA.format(content_type="application/octet-stream"))
    one = tmp / "one.json"
    one.write_text(json.dumps({"images": digits[0].tolist()}))
    many = tmp / "many.json"
    many.write_text(json.dumps({"images": digits[np.arange(256) % len(digits)].tolist()}))
    many_raw = tmp / "many.u8"
    many_raw.write_bytes(digits[np.arange(256) % len(digits)].tobytes())
    one_oip = tmp / "one-oip.json"
    one_oip.write_text(json.dumps({"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 28, 28],
                                               "data": digits[0].ravel().tolist()}]}))
    one_mlflow = tmp / "one-mlflow.json"
    one_mlflow.write_text(json.dumps({"inputs": normalize(digits[:1]).tolist()}))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "MNIST_MLOPS_PREDICTION_LOG": str(tmp / "predictions"), "MNIST_MLOPS_FEEDBACK": str(tmp / "feedback")}
    results: dict[str, dict] = {}
    c = args.connections

    def bento(name: str, extra_env: dict) -> None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [str(BIN / "bentoml"), "serve", packaged["bento"], "--host", "127.0.0.1", "--port", str(port)]
        with server(cmd, f"{url}/readyz", {**env, **extra_env}, tmp / f"{name}.log"):
            wrk(f"{url}/predict", one, script, 3, c)  # warm-up: the batcher calibrates itself
            results[name] = wrk(f"{url}/predict", one, script, args.duration, c)
            if name == "a":
                results["oip"] = wrk(f"{url}/v2/models/{MODEL_NAME}/infer", one_oip, script, args.duration, c)
                big = wrk(f"{url}/predict", many, script, max(5.0, args.duration / 2), 4)
                results["a256"] = big | {"images_per_s": big["rps"] * 256}
                raw = wrk(f"{url}/predict", many_raw, raw_script, max(5.0, args.duration / 2), 4)
                results["a256b"] = raw | {"images_per_s": raw["rps"] * 256}

    print(f"bento {packaged['bento']}  ({args.duration:g} s of load per server, {c} clients, wrk)", flush=True)
    bento("a", {"MNIST_MLOPS_LOG_PREDICTIONS": "1"})
    for key, extra in (("n", {"MNIST_MLOPS_LOG_PREDICTIONS": "0"}), ("c", {"MNIST_MLOPS_NOOP_MODEL": "1"})):
        if key in only:
            bento(key, extra)
    from mnist_mlops import registry
    from mnist_mlops.config import load_params
    from mnist_mlops.platform.tracking import setup_mlflow

    setup_mlflow(root)
    versions = sorted(int(v.version) for v in registry.client().search_model_versions(f"name='{MODEL_NAME}'"))
    champion = registry.require_champion()
    other = next((str(v) for v in reversed(versions) if str(v) != champion), None)
    # Follow mode as users run it: params.yaml's serve.follow_seconds (5 s by default).
    follow_s = load_params(root).serve.follow_seconds
    follow_env = {"MNIST_MLOPS_FOLLOW": "1", "MNIST_MLOPS_FOLLOW_SECONDS": repr(follow_s),
                  "MNIST_MLOPS_MIN_ACCURACY": repr(load_params(root).evaluate.min_accuracy)}
    if "f" in only:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [str(BIN / "bentoml"), "serve", packaged["bento"], "--host", "127.0.0.1", "--port", str(port)]
        with server(cmd, f"{url}/readyz", {**env, **follow_env}, tmp / "follow.log"):
            wrk(f"{url}/predict", one, script, 3, c)
            results["f"] = wrk(f"{url}/predict", one, script, args.duration, c)
            if other is not None:
                results["r"] = rollout(f"{url}/predict", one, script, c, (champion, other), 16 + 2 * (follow_s + 4))
            else:
                print("rollout: skipped, the registry holds one version (train another with "
                      "`mnist-mlops run --set train.seed=7`)")
        # Pinned again, right after: (f) is compared with the mean of (a) and (p), so a drift of
        # the machine over the run (later servers measured slower) does not count against (f).
        bento("p", {"MNIST_MLOPS_LOG_PREDICTIONS": "1"})
    if "b" in only:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{MODEL_NAME}/{packaged['model_version']}",
               "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]
        with server(cmd, f"{url}/ping", env, tmp / "mlflow.log"):
            wrk(f"{url}/invocations", one_mlflow, script, 3, c)
            results["b"] = wrk(f"{url}/invocations", one_mlflow, script, args.duration, c)
    batch = normalize(digits[np.arange(256) % len(digits)])
    inproc_tf, inproc_lite = in_process_images_per_s(keras_file, batch), litert_images_per_s(keras_file, batch)
    inproc = max(inproc_tf, inproc_lite)  # the ratios below use the faster of the two

    names = {"a": "(a) BentoML service (this)", "b": "(b) mlflow models serve",
             "c": "(c) same stack, no-op model", "f": "(f) (a) following the champion",
             "r": "(r) (f) during two rollouts", "n": "(n) (a) with the log off",
             "p": "(p) (a) again, after (f)"}
    print(f"\n{'server (1 digit/request)':<32} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'requests':>9}")
    names["oip"] = "(o) (a), Open Inference Protocol"
    for key in ("a", "oip", "n", "b", "c", "f", "r", "p"):
        if key in results:
            r = results[key]
            print(f"{names[key]:<32} {r['rps']:>8.1f} {r['p50'] * 1e3:>8.1f} {r['p99'] * 1e3:>8.1f} "
                  f"{r['errors']:>7} {r['requests']:>9}")
    a = results["a"]
    big = results["a256"]
    print(f"\n{'256 digits/request (4 clients)':<32} {'images/s':>9}")
    print(f"{'(a) BentoML service':<32} {big['images_per_s']:>9.0f}   "
          f"(errors {big['errors']}, p99 {big['p99'] * 1e3:.0f} ms)")
    raw = results["a256b"]
    print(f"{'(a) BentoML service, raw bytes':<32} {raw['images_per_s']:>9.0f}   "
          f"(errors {raw['errors']}, p99 {raw['p99'] * 1e3:.0f} ms)")
    print(f"{'in-process batched, TensorFlow':<32} {inproc_tf:>9.0f}")
    print(f"{'in-process batched, LiteRT':<32} {inproc_lite:>9.0f}")

    def check(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    print("\nratio                               value   target")
    if "b" in results:
        b = results["b"]
        print(f"(a)/(b) throughput               {a['rps'] / b['rps']:>8.1f}×   ≥ 15×, 0 errors: "
              f"{check(a['rps'] >= 15 * b['rps'] and a['errors'] == 0)}")
        print(f"p99 (b)/(a)                      {b['p99'] / a['p99']:>8.1f}×   ≥ 5×: "
              f"{check(b['p99'] >= 5 * a['p99'])}")
    if "c" in results:
        c_ = results["c"]
        print(f"(a)/(c) throughput               {a['rps'] / c_['rps']:>8.2f}    ≥ 0.8: "
              f"{check(a['rps'] >= 0.8 * c_['rps'])}")
    if "n" in results:
        n = results["n"]
        print(f"(a)/(n) throughput, log on/off   {a['rps'] / n['rps']:>8.2f}    ≥ 0.9, 0 errors: "
              f"{check(a['rps'] >= 0.9 * n['rps'] and a['errors'] == 0)}")
        print(f"p99 (a)/(n), log on/off          {a['p99'] / n['p99']:>8.2f}    ≤ 1.2: "
              f"{check(a['p99'] <= 1.2 * n['p99'])}")
        from mnist_mlops.records.prediction_log import read_window

        logged = len(read_window(tmp / "predictions"))
        print(f"predictions in the log           {logged:>8}    (answered by the servers with the log on)")
    print(f"256-digit requests / in-process  {big['images_per_s'] / inproc:>8.2f}    ≥ 0.5: "
          f"{check(big['images_per_s'] >= 0.5 * inproc)}")
    print(f"256 raw bytes / in-process       {raw['images_per_s'] / inproc:>8.2f}    ≥ 0.8, 0 errors: "
          f"{check(raw['images_per_s'] >= 0.8 * inproc and raw['errors'] == 0)}")
    o = results["oip"]
    print(f"OIP / /predict, 1 digit          {o['rps'] / a['rps']:>8.2f}    ≥ 0.9, 0 errors: "
          f"{check(o['rps'] >= 0.9 * a['rps'] and o['errors'] == 0)}")
    if "f" not in results:
        shutil.rmtree(tmp, ignore_errors=True)
        return
    f = results["f"]
    pinned = (a["rps"] + results["p"]["rps"]) / 2
    print(f"(f)/mean((a),(p)) follow/pinned  {f['rps'] / pinned:>8.2f}    ≥ 0.95, 0 errors: "
          f"{check(f['rps'] >= 0.95 * pinned and f['errors'] == 0)}")
    if "r" in results:
        r = results["r"]
        print(f"alias move → first new answer    {max(r['switch_s']):>8.2f} s  (each: "
              f"{', '.join(f'{s:.2f}' for s in r['switch_s'])}; within follow_seconds {follow_s:g} + load: "
              f"{check(max(r['switch_s']) <= follow_s + 5)})")
        print(f"p99 during rollouts / steady     {r['p99'] / f['p99']:>8.2f}    errors {r['errors']}: "
              f"{check(r['errors'] == 0)}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
