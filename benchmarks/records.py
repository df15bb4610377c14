"""The loop's records under hostile load: label lookups on a large prediction log, and the
memory four huge uploads at once cost a worker, and what the prediction log's writer costs.

    python benchmarks/records.py [--predictions 30000] [--ids 1000]

1. `/feedback` looks every id up in the prediction log. Baseline: the lookup as it was (a bytes
   search of every shard for every id); now: `prediction_log.find` (the id's time picks the
   shards, one regex pass each). 1,000 ids that are not in a 30,000-prediction log at the
   default `serve.log_max_mb`, both in this process, on the same files. Target: ≤ 1 s.
2. Four 5000×5000 PNGs of unevenly lit paper converted at once (threads, as BentoML's worker
   runs `/predict_image`), in a fresh process each: the worker's RSS growth with the upload
   conversion as it is, against the conversion without the early shrink (the baseline).
   Target: ≤ 300 MiB added.
3. The prediction log's writer thread, on one flush of 256 single-digit requests (as a busy
   worker queues them): baseline, one append (two fsyncs) per request, as it wrote before;
   now, `PredictionLog.flush` (the whole flush as one append, numbers rounded per batch).
   The thread runs beside the request path, on the same two cores: no target, the ratio.
Prints a table; not a test; exits 0.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import met, print_table  # noqa: E402


def build_log(directory: Path, n: int) -> None:
    from mnist_mlops.config import ServeParams
    from mnist_mlops.records import prediction_log

    log = prediction_log.PredictionLog(directory, ServeParams().log_max_mb, flush_seconds=3600)
    rng = np.random.default_rng(0)
    for start in range(0, n, 500):
        k = min(500, n - start)
        probs = rng.dirichlet(np.ones(10), k).astype(np.float32)
        x = rng.random((k, 28, 28, 1), dtype=np.float32)
        log.record(prediction_log.new_ids(k), "predict", "1", probs, x)
        log.flush()
    log.close()


def old_find(directory: Path, ids: set[str]) -> dict:
    """The lookup before: every shard's records searched for every id (bytes), then parsed."""
    from mnist_mlops.records import prediction_log, shards

    needles = [i.encode() for i in ids]
    stems = [s for s in shards.shard_stems(directory, prediction_log.PREFIX)
             if any(n in s.with_suffix(".jsonl").read_bytes() for n in needles)]
    batch = shards.read(directory, prediction_log.PREFIX, lambda r: r.get("prediction_id") in ids, stems)
    return {r["prediction_id"]: r for r in batch.records}


def lookups(n: int, k: int) -> list[list[str]]:
    from mnist_mlops.records import prediction_log

    with tempfile.TemporaryDirectory() as tmp:
        build_log(Path(tmp), n)
        unknown = set(prediction_log.new_ids(k))  # made now: the newest shards could hold them
        rows = []
        for name, fn in (("bytes search of every shard (before)", old_find),
                         ("time-picked shards, one regex pass (now)", prediction_log.find)):
            t = time.perf_counter()
            found = fn(Path(tmp), unknown)
            rows.append((name, time.perf_counter() - t, len(found)))
    base = rows[0][1]
    return [[f"{k:,} unknown ids, {n:,}-prediction log: {name}", f"{sec:.3f} s", f"{base / sec:.1f}×",
             met(sec, 1.0, higher_is_better=False) if "now" in name else ""] for name, sec, _ in rows]


def paper_png(side: int = 5000) -> bytes:
    from PIL import Image, ImageDraw

    x = np.linspace(170, 240, side, dtype=np.float32)
    img = Image.fromarray(np.broadcast_to(x.astype(np.uint8), (side, side)).copy())
    ImageDraw.Draw(img).line([(1500, 1500), (3500, 1500), (2000, 4000)], fill=30, width=400)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def upload_growth(variant: str) -> float:
    """RSS MiB added by four conversions at once, in this (fresh) process."""
    import psutil

    from mnist_mlops import imaging

    data = paper_png()
    if variant == "baseline":
        imaging.shrunk = lambda img: img  # the conversion without the early shrink
    before = psutil.Process().memory_info().rss
    peak = before
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, psutil.Process().memory_info().rss)
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    workers = [threading.Thread(target=imaging.image_to_input, args=(data,)) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    done.set()
    watcher.join()
    return (peak - before) / 2**20


def uploads() -> list[list[str]]:
    rows = []
    growth = {}
    for variant in ("baseline", "now"):
        out = subprocess.run([sys.executable, __file__, "--upload-variant", variant], capture_output=True, text=True,
                             check=True)
        growth[variant] = json.loads(out.stdout.strip().splitlines()[-1])["mib"]
    rows.append(["4 × 5000×5000 PNG at once: without the early shrink (before)", f"{growth['baseline']:.0f} MiB",
                 "", ""])
    rows.append(["4 × 5000×5000 PNG at once: shrunk to 1,024 px after decoding (now)", f"{growth['now']:.0f} MiB",
                 f"{growth['baseline'] / max(growth['now'], 1):.1f}× less", met(growth["now"], 300, False)])
    return rows


def flush_ms(per_request: bool, requests: int = 256, repeats: int = 5) -> float:
    """Milliseconds one flush of `requests` queued single-digit requests takes."""
    from mnist_mlops.records.prediction_log import PredictionLog, new_ids

    rng = np.random.default_rng(0)
    log = PredictionLog(Path(tempfile.mkdtemp(prefix="bench-log-")), 500, flush_seconds=3600)
    write = log._write
    if per_request:  # the baseline: each request's records appended (and fsynced) on their own
        log._write = lambda pending: [write([entry]) for entry in pending]
    total = 0.0
    for _ in range(repeats):
        for _ in range(requests):
            log.record(new_ids(1), "predict", "1", rng.dirichlet(np.ones(10), 1).astype(np.float32),
                       rng.random((1, 28, 28, 1), dtype=np.float32))
        start = time.perf_counter()
        log.flush()
        total += time.perf_counter() - start
    log.close()
    return total / repeats * 1000


def flushes() -> list[list[str]]:
    before, now = flush_ms(True), flush_ms(False)
    return [["log flush of 256 single-digit requests: one append each (before)", f"{before:.1f} ms", "", ""],
            ["log flush of 256 single-digit requests: one append (now)", f"{now:.1f} ms",
             f"{before / now:.1f}× less", "—"]]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--predictions", type=int, default=30_000)
    parser.add_argument("--ids", type=int, default=1000)
    parser.add_argument("--upload-variant", choices=["baseline", "now"])
    args = parser.parse_args()
    if args.upload_variant:
        print(json.dumps({"mib": upload_growth(args.upload_variant)}))
        return
    print_table("the loop's records under load", ["measure", "value", "vs before", "target"],
                lookups(args.predictions, args.ids) + uploads() + flushes())


if __name__ == "__main__":
    main()
