"""Stress run: 64 concurrent clients for 60 s against the served champion, valid and invalid requests mixed.

    python benchmarks/stress.py [--project DIR] [--clients 64] [--duration 60] [--warmup 10]

Starts `mnist-mlops serve` (the champion's Bento, built if missing) on 127.0.0.1, then
drives it with `--clients` asyncio clients for `--duration` seconds. About 70% of the
requests are valid (/predict with 1–8 test digits, /predict_image with a PNG) and must be
answered 200 with the champion's own answer (computed here from the same Keras file);
the rest are invalid in a dozen ways and must get a 4xx. Checks, printed as a table:
0 responses 5xx, 0 wrong answers, 0 transport errors, RSS of the server's process tree
at the end within 10% of its value after warm-up, /readyz 200 afterwards.
Exits 1 if a check fails. Honours $MNIST_MLOPS_API_KEY (sent as X-API-Key).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BIN, QUIET, print_table  # noqa: E402

VALID_SHARE = 0.7


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss(pid: int) -> int:
    """Resident memory of a process and all its descendants (the BentoML server and workers)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def png(digit: np.ndarray) -> bytes:
    """A 28×28 MNIST digit as a 140×140 dark-on-light PNG, as a phone picture would be."""
    from PIL import Image

    img = Image.fromarray(255 - digit.astype(np.uint8)).resize((140, 140), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def invalid_requests() -> list[tuple[str, str, dict]]:
    """(name, method path, httpx kwargs): requests a correct service answers with a 4xx."""
    zeros = [[0] * 28 for _ in range(28)]
    js = {"Content-Type": "application/json"}
    return [
        ("wrong shape", "POST /predict", {"json": {"images": [[1, 2, 3]]}}),
        ("ragged rows", "POST /predict", {"json": {"images": [zeros[:27] + [[0] * 5]]}}),
        ("pixel out of range", "POST /predict", {"json": {"images": [[[300] * 28] * 28]}}),
        ("float over 1", "POST /predict", {"json": {"images": [[[1.5] * 28] * 28]}}),
        ("strings", "POST /predict", {"json": {"images": [[["a"] * 28] * 28]}}),
        ("empty list", "POST /predict", {"json": {"images": []}}),
        ("missing field", "POST /predict", {"json": {"pictures": zeros}}),
        ("not JSON", "POST /predict", {"content": b"{{{ not json", "headers": js}),
        ("JSON null", "POST /predict", {"content": b"null", "headers": js}),
        ("garbage image", "POST /predict_image", {"files": {"image": ("x.png", os.urandom(512))}}),
        ("empty image", "POST /predict_image", {"files": {"image": ("x.png", b"")}}),
        ("wrong file field", "POST /predict_image", {"files": {"picture": ("x.png", b"\x89PNG")}}),
        ("GET on an API", "GET /predict", {}),
        ("unknown path", "GET /no-such-endpoint", {}),
    ]


async def load(url: str, clients: int, duration: float, valid_json: list[tuple[bytes, list[int]]],
               valid_png: list[tuple[bytes, int]], headers: dict, seed: int = 0,
               valid_share: float = VALID_SHARE) -> dict:
    import httpx

    invalid = invalid_requests()
    counts: Counter = Counter()  # (kind, status)
    wrong: list[str] = []
    transport: Counter = Counter()
    latencies: list[float] = []
    deadline = time.monotonic() + duration
    # The server (uvicorn) closes a connection idle for 5 s; a client keeping idle connections
    # as long (httpx's default) races that close and sees a ReadError on ~0.2% of requests that
    # never reached the service. Clients should expire idle connections first, as done here.
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients, keepalive_expiry=2.0)

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits, headers=headers) as client:
        async def worker(i: int) -> None:
            rng = random.Random(seed * 1000 + i)
            while time.monotonic() < deadline:
                start = time.perf_counter()
                kind = "?"
                try:
                    if rng.random() < valid_share:
                        if rng.random() < 0.8:
                            body, expected = rng.choice(valid_json)
                            kind = "valid /predict"
                            resp = await client.post("/predict", content=body,
                                                     headers={"Content-Type": "application/json"})
                            got = [p["digit"] for p in resp.json()] if resp.status_code == 200 else None
                        else:
                            data, digit = rng.choice(valid_png)
                            kind = "valid /predict_image"
                            resp = await client.post("/predict_image", files={"image": ("digit.png", data)})
                            expected = [digit]
                            got = [resp.json()["digit"]] if resp.status_code == 200 else None
                        if resp.status_code == 200 and got != expected:
                            wrong.append(f"{kind}: expected {expected}, got {got}")
                    else:
                        name, route, kw = rng.choice(invalid)
                        method, path = route.split(" ")
                        kind = f"invalid: {name}"
                        resp = await client.request(method, path, **kw)
                    counts[(kind, resp.status_code)] += 1
                    latencies.append(time.perf_counter() - start)
                except httpx.HTTPError as exc:
                    transport[f"{kind}: {type(exc).__name__}"] += 1

        await asyncio.gather(*(worker(i) for i in range(clients)))
    return {"counts": counts, "wrong": wrong, "transport": transport, "latencies": latencies}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=None, help="project dir (default: the current one)")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load after warm-up")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds of the same load before measuring")
    parser.add_argument("--valid-share", type=float, default=VALID_SHARE, help="fraction of valid requests")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = parser.parse_args()
    os.environ.update(QUIET)
    if args.project:
        os.environ["MNIST_MLOPS_ROOT"] = str(args.project.resolve())

    import httpx

    from mnist_mlops.config import project_root, tracking_uri
    from mnist_mlops.errors import UserError
    from mnist_mlops.imaging import image_to_input
    from mnist_mlops.preprocess import normalize
    from mnist_mlops.scoring import load_keras, probabilities
    from mnist_mlops.serving.package import KERAS_FILE, package_champion

    root = project_root()
    os.environ.setdefault("MLFLOW_TRACKING_URI", tracking_uri(root))
    try:
        packaged = package_champion(root)
    except UserError as exc:
        raise SystemExit(f"error: {exc}") from None
    import bentoml

    # The champion's own answers, from the very Keras file the Bento serves.
    model = load_keras(Path(bentoml.models.get(packaged["model"]).path_of(KERAS_FILE)))
    x = np.load(root / "artifacts" / "prepared" / "test_x.npy")
    digits = np.rint(x[..., 0] * 255).astype(np.uint8)[:400]
    expected = probabilities(model, normalize(digits)).argmax(axis=1)
    rng = np.random.default_rng(0)
    valid_json = []
    for _ in range(300):
        idx = rng.choice(len(digits), size=int(rng.choice([1, 2, 4, 8])), replace=False)
        valid_json.append((json.dumps({"images": digits[idx].tolist()}).encode(), expected[idx].tolist()))
    valid_png = []
    for i in range(60):
        data = png(digits[i])
        valid_png.append((data, int(probabilities(model, image_to_input(data)).argmax(axis=1)[0])))

    headers = {"X-API-Key": key} if (key := os.environ.get("MNIST_MLOPS_API_KEY")) else {}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(tempfile.mkdtemp(prefix="bench-stress-")) / "serve.log"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    with log.open("w") as fh:
        proc = subprocess.Popen([str(BIN / "mnist-mlops"), "serve", "--port", str(port)], cwd=root, env=env,
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    samples: list[tuple[float, int]] = []
    stop = threading.Event()
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"server exited {proc.returncode}: see {log}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"server not ready in 300 s: see {log}")
            time.sleep(0.5)
        rss_ready = tree_rss(proc.pid)
        t0 = time.monotonic()

        def sample() -> None:
            while not stop.wait(1.0):
                samples.append((time.monotonic() - t0, tree_rss(proc.pid)))

        threading.Thread(target=sample, daemon=True).start()
        print(f"bento {packaged['bento']} on {url}: {args.clients} clients, {args.warmup:g} s warm-up + "
              f"{args.duration:g} s measured", flush=True)
        warm = asyncio.run(load(url, args.clients, args.warmup, valid_json, valid_png, headers, 1, args.valid_share))
        rss_warm = tree_rss(proc.pid)
        t_measure = time.monotonic()
        result = asyncio.run(load(url, args.clients, args.duration, valid_json, valid_png, headers, 2,
                                  args.valid_share))
        elapsed = time.monotonic() - t_measure
        rss_end = tree_rss(proc.pid)
        stop.set()
        ready_after = httpx.get(f"{url}/readyz", timeout=10, headers=headers).status_code
        health_after = httpx.get(f"{url}/healthz", timeout=10, headers=headers).status_code
    finally:
        stop.set()
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(wait)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue

    counts: Counter = result["counts"] + warm["counts"]
    measured = result["counts"]
    total = sum(measured.values())
    by_status = Counter()
    for (_kind, status), n in measured.items():
        by_status[status] += n
    server_errors = sum(n for (_k, s), n in counts.items() if s >= 500)
    valid_bad = sum(n for (k, s), n in counts.items() if k.startswith("valid") and s != 200)
    invalid_not_4xx = sum(n for (k, s), n in counts.items() if k.startswith("invalid") and not 400 <= s < 500)
    wrong = result["wrong"] + warm["wrong"]
    transport = result["transport"] + warm["transport"]
    lat = np.sort(np.array(result["latencies"])) if result["latencies"] else np.zeros(1)
    in_window = [r for t, r in samples if t >= args.warmup]
    quarters = [next((r for t, r in samples if t >= args.warmup + q * args.duration / 4), rss_end)
                for q in (1, 2, 3)] + [rss_end]
    rss_max = max(in_window, default=rss_end)
    growth = (rss_end - rss_warm) / rss_warm if rss_warm else float("inf")
    mib = 1024 * 1024

    rows = [[f"{kind} → {status}", n] for (kind, status), n in sorted(measured.items())]
    print_table(f"measured window: {total} requests in {elapsed:.1f} s ({total / elapsed:.1f} req/s), "
                f"p50 {np.percentile(lat, 50) * 1e3:.0f} ms, p99 {np.percentile(lat, 99) * 1e3:.0f} ms",
                ["request kind → status", "responses"], rows)
    checks = [
        ("requests (warm-up + measured)", f"{sum(counts.values())} ({sum(warm['counts'].values())} + {total})", ""),
        ("responses by status (measured)", ", ".join(f"{s}: {n}" for s, n in sorted(by_status.items())), ""),
        ("5xx responses", server_errors, "0"),
        ("valid requests not answered 200", valid_bad, "0"),
        ("valid answers that differ from the champion's", len(wrong), "0"),
        ("invalid requests not answered 4xx", invalid_not_4xx, "0"),
        ("transport errors (timeouts, resets)", sum(transport.values()) or 0, "0"),
        ("RSS when ready (MiB)", f"{rss_ready / mib:.0f}", ""),
        ("RSS after warm-up (MiB)", f"{rss_warm / mib:.0f}", ""),
        ("RSS at the end (MiB), max in window", f"{rss_end / mib:.0f}, max {rss_max / mib:.0f}", ""),
        ("RSS at each quarter of the window (MiB)", " → ".join(f"{r / mib:.0f}" for r in quarters), ""),
        ("RSS growth after warm-up", f"{growth * 100:+.1f}%", "≤ +10%"),
        ("/readyz and /healthz afterwards", f"{ready_after}, {health_after}", "200, 200"),
    ]
    ok = (server_errors == 0 and valid_bad == 0 and not wrong and invalid_not_4xx == 0 and not transport
          and growth <= 0.10 and ready_after == 200 and health_after == 200)
    print_table("stress checks", ["figure", "value", "target"], [list(map(str, c)) for c in checks])
    if wrong:
        print("first wrong answers:", *wrong[:5], sep="\n  ")
    if transport:
        print("transport errors:", dict(transport))
    print("RESULT:", "all checks met" if ok else "CHECKS MISSED")
    if args.json:
        args.json.write_text(json.dumps({
            "requests": total, "warmup_requests": sum(warm["counts"].values()), "seconds": elapsed,
            "by_status": {str(k): v for k, v in sorted(by_status.items())}, "server_errors": server_errors,
            "wrong_answers": len(wrong), "invalid_not_4xx": invalid_not_4xx,
            "transport_errors": dict(transport), "rss_ready": rss_ready, "rss_after_warmup": rss_warm,
            "rss_end": rss_end, "rss_max": rss_max, "rss_quarters": quarters, "rss_growth": growth,
            "readyz_after": ready_after,
            "ok": ok}, indent=2) + "\n")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
