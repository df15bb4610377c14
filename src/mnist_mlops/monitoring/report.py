"""The monitoring report: one self-contained HTML page (plots inlined as PNG), meant to be looked
at: class histogram vs the training labels, confidence and feature distributions vs the
reference, live accuracy per class, and the digits the model was least sure of."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

from mnist_mlops.digit_features import FEATURES, feature_arrays
from mnist_mlops.monitoring.check import Result
from mnist_mlops.monitoring.reference import Reference

STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .7em;text-align:left}
.drift{color:#b00020;font-weight:bold}.ok{color:#1b5e20}img{max-width:100%}h1{margin-bottom:.2em}"""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    _pyplot().close(fig)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _share(counts: np.ndarray) -> np.ndarray:
    return counts / max(counts.sum(), 1)


def classes_plot(result: Result, reference: Reference) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3))
    window = np.bincount(result.traffic.predicted, minlength=10)[:10]
    digits = np.arange(10)
    ax.bar(digits - 0.27, _share(reference.label_counts), 0.27, label="training labels")
    ax.bar(digits, _share(reference.predicted_counts), 0.27, label="answers on the test split")
    ax.bar(digits + 0.27, _share(window), 0.27, label="answers in the window")
    ax.set_xticks(digits)
    ax.set_title("classes")
    ax.legend()
    return _png(fig)


def distributions_plot(result: Result, reference: Reference) -> str:
    """Confidence and each feature: reference vs window, as density histograms."""
    plt = _pyplot()
    window = {"confidence": result.traffic.confidence, **(result.features or feature_arrays(result.traffic.images))}
    ref = {"confidence": reference.confidence, **reference.features}
    drifted = set(result.drifted)
    fig, axes = plt.subplots(2, 4, figsize=(13, 5.5))
    for ax, name in zip(axes.flat, ["confidence", *FEATURES], strict=False):
        lo, hi = float(min(ref[name].min(), window[name].min())), float(max(ref[name].max(), window[name].max()))
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 30)
        ax.hist(ref[name], bins=bins, density=True, alpha=0.5, label="reference")
        ax.hist(window[name], bins=bins, density=True, alpha=0.5, label="window")
        ax.set_title(name + ("  DRIFT" if name in drifted else ""), color="#b00020" if name in drifted else "black")
    axes.flat[-1].axis("off")
    axes.flat[0].legend()
    fig.tight_layout()
    return _png(fig)


def accuracy_plot(result: Result) -> str:
    live = result.accuracy.get("all")
    if live is None or not live.n:
        return "<p>No labels in this window.</p>"
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3))
    digits = sorted(live.per_class)
    ax.bar(digits, [live.per_class[d][0] / live.per_class[d][1] for d in digits])
    for d in digits:
        ax.annotate(f"n={live.per_class[d][1]}", (d, 0.02), ha="center", fontsize=7)
    ax.set_xticks(range(10))
    ax.set_ylim(0, 1)
    ax.set_title("live accuracy per labelled class")
    return _png(fig)


def lowest_plot(result: Result) -> str:
    """The least confident digits as one mosaic (one image, not one axis per digit: 36 axes
    take matplotlib ~1.5 s), each titled with its answer and confidence."""
    images, records = result.lowest()
    if not len(images):
        return "<p>No predictions in this window.</p>"
    plt = _pyplot()
    cols, cell = 12, 34  # 28 pixels and a gutter
    rows = (len(images) + cols - 1) // cols
    mosaic = np.zeros((rows * cell, cols * cell), np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        mosaic[r * cell + 6: r * cell + 34, c * cell + 3: c * cell + 31] = img
    fig, ax = plt.subplots(figsize=(cols * 0.9, rows * 0.95))
    ax.imshow(mosaic, cmap="gray_r", interpolation="nearest")
    for i, rec in enumerate(records):
        r, c = divmod(i, cols)
        ax.text(c * cell + 17, r * cell + 5, f"{rec['digit']} {rec['confidence']:.2f}", fontsize=6,
                ha="center", color="#b00020")
    ax.axis("off")
    return _png(fig)


def _table(rows: dict[str, str]) -> str:
    return "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                               for k, v in rows.items()) + "</table>"


def _checks_table(result: Result) -> str:
    if not result.checks:
        return ""
    head = "<tr><th>check</th><th>test</th><th>effect</th><th>p-value</th><th>drift</th></tr>"
    body = "".join(
        f"<tr><td>{c.name}</td><td>{c.test}</td><td>{c.effect:.3f} ({'PSI' if c.name == 'classes' else 'D'})</td>"
        f"<td>{c.p_value:.2g}</td><td class=\"{'drift' if c.drifted else 'ok'}\">{'yes' if c.drifted else 'no'}</td>"
        "</tr>" for c in result.checks)
    return f"<h2>Drift checks</h2><table>{head}{body}</table>"


def _accuracy_table(result: Result) -> str:
    """Live accuracy per model version (the labels' `model_version`), with 95% intervals."""
    rows = [(v, a) for v, a in result.accuracy.items() if a.n]
    if not rows:
        return ""
    head = "<tr><th>model version</th><th>labels</th><th>accuracy</th><th>95% interval</th></tr>"
    body = "".join(f"<tr><td>{html.escape(v)}</td><td>{a.n}</td><td>{a.value:.3f}</td>"
                   f"<td>{a.low:.3f} to {a.high:.3f}</td></tr>" for v, a in rows)
    return f"<table>{head}{body}</table>"


def render(result: Result, reference: Reference) -> str:
    """The whole page; a window without traffic says so instead of plotting nothing."""
    verdict = html.escape(result.verdict)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>MNIST monitoring: {verdict}</title>"
             f"<style>{STYLE}</style></head><body>",
             f"<h1>MNIST monitoring: <span class=\"{'drift' if result.drifted else 'ok'}\">{verdict}</span></h1>",
             _table(result.summary())]
    if result.traffic.records:
        parts += [_checks_table(result), "<h2>Classes</h2>", classes_plot(result, reference),
                  "<h2>Confidence and input features</h2>", distributions_plot(result, reference),
                  "<p>" + "; ".join(f"<b>{k}</b>: {v}" for k, v in FEATURES.items()) + "</p>"]
        if result.low_confidence:
            w, r = result.low_confidence
            parts.append(f"<p>Low-confidence answers: {w:.1%} of the window, {r:.1%} on the test split.</p>")
    parts += ["<h2>Live accuracy</h2>", _accuracy_table(result), accuracy_plot(result)]
    if result.traffic.records:
        parts += ["<h2>Least confident answers (answer, confidence)</h2>", lowest_plot(result)]
    parts.append("</body></html>")
    return "\n".join(parts)


def write(result: Result, reference: Reference, directory: Path) -> Path:
    """reports/monitoring/monitor-<end time>.html, written atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"monitor-{result.end:%Y%m%dT%H%M%S}Z.html"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(render(result, reference))
    tmp.replace(path)
    return path
