"""A lineage card shown to people: rows for a terminal, a small self-contained HTML page.

The digit as the model saw it: shaded blocks in the terminal, a PNG data URL in HTML (and in
the service's JSON), so the card is one file that opens anywhere, with no network.
"""

from __future__ import annotations

import base64
import html
import io

import numpy as np

SHADES = " ░▒▓█"


def png_data_url(image: list | np.ndarray, scale: int = 4) -> str:
    """The 28×28 digit as a PNG data URL, `scale` times larger (nearest: the pixels stay pixels)."""
    from PIL import Image

    pixels = np.asarray(image, np.uint8).reshape(28, 28)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "L").resize((28 * scale, 28 * scale), Image.NEAREST).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def for_json(card: dict) -> dict:
    """The card for machines (`--json`, the service): the digit as a PNG data URL."""
    if pred := card.get("prediction"):
        return card | {"prediction": pred | {"image": png_data_url(pred["image"])}}
    return card


def terminal_picture(image: list | np.ndarray) -> str:
    """14 lines of shaded blocks: each character is two rows of one column."""
    pixels = np.asarray(image, float).reshape(14, 2, 28).mean(axis=1) / 255
    return "\n".join("".join(SHADES[min(int(v * len(SHADES)), len(SHADES) - 1)] for v in row) for row in pixels)


def rows(card: dict) -> list[tuple[str, str, str]]:
    """(section, field, value) for everything the card says, in reading order."""
    out: list[tuple[str, str, str]] = []
    if pred := card.get("prediction"):
        answer = (f"{pred['digit']} at {pred['confidence']:.2f} (top 3: "
                  + ", ".join(f"{t['digit']} {t['probability']:.2f}" for t in pred["top3"]) + ")"
                  if "digit" in pred else "not in the prediction log")
        out += [("prediction", "id", pred["id"]), ("prediction", "time", pred["time"]),
                ("prediction", "endpoint", pred.get("endpoint", "unknown")), ("prediction", "answer", answer)]
        if note := pred.get("note"):
            out.append(("prediction", "note", note))
    if pred and (label := card.get("label")):
        out += [("label", "given", f"{label['label']} at {label['time']} ({label['source']})"),
                ("label", "state", label["state"])]
    elif pred:
        out.append(("label", "given", "none"))
    if (model := card.get("model")) and "error" in model:
        out.append((f"model v{model['version']}", "error", model["error"]))
    elif model:
        out += model_rows(model)
    return out


def model_rows(model: dict) -> list[tuple[str, str, str]]:
    data, decision, links = model["data"], model["decision"], model["links"]
    section = f"model v{model['version']}" + (" (champion)" if model["champion"] else "")
    changed = ", ".join(f"{k}={v['value']} (default {v['default']})" for k, v in model["params_changed"].items())
    out = [(section, "MLflow run", f"{model['run_name']} ({model['run_id']})"),
           (section, "git commit", model["git_commit"] or "unknown"),
           (section, "data version", f"{data['md5']}: {data['base_digits']} base digits ({data['source']}) + "
                                     f"{data['feedback_digits']} labelled by people"
                                     + (f", newest label {data['newest_label']}" if data["newest_label"] else "")),
           (section, "params changed", changed or "none: the defaults"),
           (section, "scores", ", ".join(f"{k} {v:.4f}" for k, v in model["scores"].items())),
           ("decisions", "gate", f"{decision['verdict'] or 'not decided'}: {decision['reason']}"),
           ("decisions", "champion by", decision["decided_by"] or "never champion")]
    out += [("links", name.replace("_", " "), url) for name, url in links.items() if url]
    return out


def print_card(card: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=True)
    if pred := card.get("prediction"):
        console.print(terminal_picture(pred["image"]), highlight=False)
    table = Table(show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_column(overflow="fold")  # ids and URLs whole
    shown = None
    for section, name, value in rows(card):
        table.add_row(section if section != shown else "", name, value)
        shown = section
    console.print(table)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 15px/1.4 system-ui, sans-serif; margin: 2em; max-width: 60em; color: #222; }}
img {{ image-rendering: pixelated; border: 1px solid #999; }}
table {{ border-collapse: collapse; margin-top: 1em; }}
th, td {{ text-align: left; vertical-align: top; padding: .3em .8em; border-bottom: 1px solid #ddd; }}
td {{ overflow-wrap: anywhere; }}
th {{ color: #555; font-weight: 600; white-space: nowrap; }}
</style></head>
<body><h1>{title}</h1>{picture}
<table>{body}</table></body></html>
"""


def html_card(card: dict) -> str:
    pred = card.get("prediction")
    title = f"Prediction {pred['id']}" if pred else f"Model version v{card['model']['version']}"
    picture = f'<img id="digit" alt="the digit as the model saw it" src="{png_data_url(pred["image"])}">' \
        if pred else ""
    lines, shown = [], None
    for section, name, value in rows(card):
        head = html.escape(section) if section != shown else ""
        lines.append(f"<tr><th>{head}</th><th>{html.escape(name)}</th><td>{value_html(value)}</td></tr>")
        shown = section
    body = "".join(lines)
    return PAGE.format(title=html.escape(title), picture=picture, body=body)


def value_html(value: str) -> str:
    if value.startswith(("http://", "https://")):
        return f'<a href="{html.escape(value)}">{html.escape(value)}</a>'
    return html.escape(value)
