"""The --report page of diff_torch.py and diff_coreml.py: one self-contained index.html (plots embedded
as base64 PNGs, also kept beside it) showing the largest activation per layer before and after the
rotation, the disagreement per token along each evaluation text, and the metrics.

Knows plots and HTML, nothing of models or command lines. matplotlib is imported here only, lazily,
and draws with Agg in a fixed style, so the same data give the same bytes.
"""
import base64
import html
import io
import re
from pathlib import Path

import numpy as np

from output_files import publish, staging_folder
from user_errors import UserError, writing

FLOAT16_MAX = 65504.0                          # as model.FLOAT16_MAX (not imported: this module needs no torch)
PLOTS = {"activations": "activations.png", "disagreement": "kl_per_token.png"}
REPORT_FILES = ("index.html", *PLOTS.values())
# measure -> (its short name, the axis label); the reference is float32 transformers in both scripts
MEASURES = {"kl": ("KL", "KL(transformers ‖ ours), nats"),
            "cosine": ("1 − cosine", "1 − cosine(transformers, ours)")}
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf"]
STYLE = {"font.family": "DejaVu Sans", "font.size": 9, "axes.grid": True, "grid.alpha": 0.3,
         "axes.spines.top": False, "axes.spines.right": False, "legend.frameon": False, "savefig.dpi": 100}


# ----------------------------------------------------------------------------- the folder

def check_report_folder(path: str | None, force: bool) -> None:
    """What a report folder needs beyond evaluation.check_output_path's rules (the scripts check both,
    before any slow work): an existing one is replaced only with --force, and only when it is empty or
    holds a previous report, never a folder with anything else in it."""
    if not path:
        return
    folder = Path(path)
    if folder.name in ("", ".", ".."):
        raise UserError(f"--report needs a folder name, not {path}")
    if not folder.parent.is_dir():
        raise UserError(f"cannot write {path}: folder {folder.parent} does not exist")
    if folder.exists() and not force:
        raise UserError(f"{path} exists; pass --force to overwrite it")
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{path} exists and is not a folder")
    if folder.is_dir() and {p.name for p in folder.iterdir()} - set(REPORT_FILES):
        raise UserError(f"{path} holds files that are not a report; --force replaces only a previous report")


def write_report(path: str, *, title: str, facts: dict, metrics: dict, peaks: dict[str, dict[str, float]],
                 n_layers: int, disagreement: list[np.ndarray], measure: str, pooled: bool,
                 notes: list[str] = (), force: bool = False) -> None:
    """Write the report folder atomically (a temporary folder beside it, renamed into place).

    facts: what was compared, label -> value. peaks: series label -> {name: largest |value|}, names as
    model.py's probes ("embeddings...", "layers.3...", anything else counts as the head). disagreement:
    per text, one value per token (or a single value for pooled tasks); measure: "kl" or "cosine"."""
    check_report_folder(path, force)
    folder = Path(path)
    layers = layer_labels(n_layers)
    series = {label: peaks_per_layer(values, n_layers) for label, values in peaks.items()}
    images = {"activations": activations_png(layers, series),
              "disagreement": disagreement_png(disagreement, measure, pooled)}
    page = render_page(title, facts, metrics, layers, series, images, disagreement, measure, pooled, notes)
    with writing(path):                                   # a full disk: one line, and nothing left behind
        with staging_folder(folder) as staging:
            for key, png in images.items():
                (staging / PLOTS[key]).write_bytes(png)
            (staging / "index.html").write_text(page, encoding="utf-8")
            publish(staging, folder, force)


# ----------------------------------------------------------------------------- data

def layer_labels(n_layers: int) -> list[str]:
    return ["embeddings", *(str(i) for i in range(n_layers)), "head"]


def peaks_per_layer(max_abs: dict[str, float], n_layers: int) -> np.ndarray:
    """The largest value per layer (embeddings, 0..n-1, head) over names like model.py's probes
    ("layers.3.mlp_norm.square"); NaN where a layer has none, inf where something overflowed."""
    peaks = np.full(n_layers + 2, np.nan)
    for name, value in max_abs.items():
        match = re.match(r"layers\.(\d+)(\.|$)", name)
        i = 0 if name.startswith("embeddings") else int(match[1]) + 1 if match else n_layers + 1
        peaks[i] = value if np.isnan(peaks[i]) else max(peaks[i], value)
    return peaks


def log_scale_values(values: np.ndarray, floor: float) -> np.ndarray:
    """Values for a log axis: zero or negative (rounding) drawn at `floor`; NaN (nothing recorded) stays a gap."""
    return np.where((values > 0) | np.isnan(values), values, floor)


def smallest_positive(arrays, default: float) -> float:
    positive = [a[np.isfinite(a) & (a > 0)] for a in arrays]
    positive = np.concatenate(positive) if positive else np.array([])
    return float(positive.min()) if positive.size else default


# ----------------------------------------------------------------------------- plots

def new_figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(8.4, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png_bytes(draw, *args) -> bytes:
    """Draw with the fixed style and return the PNG (no software or date in its metadata)."""
    import matplotlib.style
    with matplotlib.style.context("default"), matplotlib.rc_context(STYLE):
        fig = new_figure()
        draw(fig, *args)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def draw_activations(fig, layers: list[str], series: dict[str, np.ndarray]) -> None:
    ax = fig.subplots()
    x = np.arange(len(layers))
    finite = [v[np.isfinite(v)] for v in series.values()]
    high = max([FLOAT16_MAX, *(float(v.max()) for v in finite if v.size)])
    overflow_at = high * 4                                    # where a value beyond float16 is drawn
    floor = smallest_positive(list(series.values()), 1.0) / 2
    for color, (label, values) in zip(COLORS, series.items()):
        shown = log_scale_values(np.where(np.isinf(values), overflow_at, values), floor)
        ax.plot(x, shown, marker="o", markersize=3.5, linewidth=1.4, color=color, label=label)
        over = np.isinf(values)
        if over.any():
            ax.plot(x[over], shown[over], linestyle="none", marker="^", markersize=9, color=color)
    if any(np.isinf(v).any() for v in series.values()):
        ax.plot([], [], linestyle="none", marker="^", markersize=9, color="#444444",
                label="beyond float16 (overflow), drawn at the top")
    ax.axhspan(FLOAT16_MAX, overflow_at * 4, color="#c00000", alpha=0.06, linewidth=0)
    ax.axhline(FLOAT16_MAX, color="#c00000", linestyle="--", linewidth=1, label="float16 max (65504)")
    ax.set_yscale("log")
    ax.set_ylim(floor / 2, overflow_at * 4)
    ax.set_xticks(x, layers, rotation=0 if len(layers) <= 16 else 90)
    ax.set_xlabel("layer")
    ax.set_ylabel("largest |value|")
    fig.legend(loc="outside upper center", ncols=2, fontsize=8)


def draw_disagreement(fig, disagreement: list[np.ndarray], measure: str, pooled: bool) -> None:
    ax = fig.subplots()
    high = max([float(v[np.isfinite(v)].max()) for v in disagreement if np.isfinite(v).any()] or [1.0])
    nonfinite_at = max(high, 1e-12) * 10
    floor = smallest_positive(disagreement, 1e-16) / 2
    values = [log_scale_values(np.where(np.isfinite(v), v, nonfinite_at), floor) for v in disagreement]
    if pooled:
        texts = np.arange(1, len(values) + 1)
        heights = np.array([v[0] for v in values])
        ax.bar(texts, heights - floor / 2, bottom=floor / 2, color=COLORS[0])
        ax.set_xticks(texts)
        ax.set_xlabel("evaluation text (one pooled output each)")
    else:
        for i, v in enumerate(values):
            ax.plot(np.arange(len(v)), v, linewidth=0.9, color=COLORS[i % len(COLORS)],
                    label=f"text {i + 1} ({len(v)} tokens)")
        ax.set_xlabel("token position")
        fig.legend(loc="outside right upper", fontsize=8)
    bad = [(i, ~np.isfinite(v)) for i, v in enumerate(disagreement) if not np.isfinite(v).all()]
    for i, mask in bad:
        x = np.array([i + 1]) if pooled else np.flatnonzero(mask)
        ax.plot(x, np.full(len(x), nonfinite_at), linestyle="none", marker="x", markersize=8, color="#c00000")
    ax.set_yscale("log")
    ax.set_ylabel(MEASURES[measure][1] + ("" if pooled else " per token"))


def activations_png(layers: list[str], series: dict[str, np.ndarray]) -> bytes:
    return png_bytes(draw_activations, layers, series)


def disagreement_png(disagreement: list[np.ndarray], measure: str, pooled: bool) -> bytes:
    return png_bytes(draw_disagreement, disagreement, measure, pooled)


# ----------------------------------------------------------------------------- the page

CSS = """
body { font: 15px/1.45 -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; color: #222; margin: 0; }
main { max-width: 900px; margin: 0 auto; padding: 24px 20px 48px; }
h1 { font-size: 21px; margin: 0 0 12px; } h2 { font-size: 17px; margin: 28px 0 8px; }
table { border-collapse: collapse; font-size: 14px; }
th, td { text-align: left; padding: 3px 14px 3px 0; border-bottom: 1px solid #e4e4e4; vertical-align: top; }
td.num { font-family: "DejaVu Sans Mono", Menlo, monospace; }
figure { margin: 0; } img { max-width: 100%; height: auto; display: block; }
figcaption, .note { font-size: 13px; color: #555; margin-top: 6px; }
details { margin-top: 8px; font-size: 13px; } summary { cursor: pointer; color: #555; }
"""


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "none" if value is None else str(value)


def html_table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(
        f'<td class="num">{esc(format_value(v))}</td>' if isinstance(v, (int, float)) and not isinstance(v, bool)
        else f"<td>{esc(format_value(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def figure_html(png: bytes, alt: str, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{esc(alt)}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def activations_caption(series: dict) -> str:
    return ("The largest |value| per layer over every recorded intermediate: the residual stream, the norms and "
            "their squares (for a package: every op of the layer). Log scale; the dashed line is float16's largest "
            "value, 65504; a triangle at the top marks a layer where something exceeded it (or was not finite). "
            + ("Only one model was run, so there is nothing to compare against."
               if len(series) == 1 else ""))


def disagreement_caption(measure: str, pooled: bool) -> str:
    what = MEASURES[measure][1]
    if pooled:
        return (f"{what} for each evaluation text: this task has one pooled output per text, so a bar per text "
                f"replaces the curve along the sequence. Log scale; a red cross marks a non-finite output.")
    return (f"{what} at each token position, one line per evaluation text (padding left out). Log scale; "
            f"zero (or negative, from rounding) is drawn at the bottom, a red cross marks a non-finite output.")


def render_page(title, facts, metrics, layers, series, images, disagreement, measure, pooled, notes) -> str:
    peak_rows = [[layer, *(float(v[i]) for v in series.values())] for i, layer in enumerate(layers)]
    text_rows = [[i + 1, len(v), float(np.mean(v)), float(np.max(v))] for i, v in enumerate(disagreement)]
    short, label = MEASURES[measure]
    heading = f"{short} per text" if pooled else f"{short} per token, along each text"
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
        "style-src 'unsafe-inline'\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{CSS}</style></head>",
        "<body><main>",
        f"<h1>{esc(title)}</h1>",
        *(f'<p class="note">{esc(note)}</p>' for note in notes),
        html_table(["compared", ""], [[k, v] for k, v in facts.items()]),
        "<h2>Metrics</h2>",
        html_table(["metric", "value"], [[k, v] for k, v in metrics.items()]),
        '<p class="note">Over the built-in evaluation texts: their non-padding tokens, or one row per text for '
        f'pooled tasks{"; KL in nats per token" if measure == "kl" else ""}.</p>',
        "<h2>Largest activation per layer, before and after the rotation</h2>",
        figure_html(images["activations"], "largest absolute activation per layer", activations_caption(series)),
        "<details><summary>the values</summary>", html_table(["layer", *series], peak_rows), "</details>",
        f"<h2>{esc(heading)}</h2>",
        figure_html(images["disagreement"], f"{label}, {heading}", disagreement_caption(measure, pooled)),
        "<details><summary>per text</summary>",
        html_table(["text", "tokens" if not pooled else "outputs", "mean", "max"], text_rows), "</details>",
        "</main></body></html>",
        ""])
