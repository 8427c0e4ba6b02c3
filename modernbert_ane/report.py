"""The --report page of diff_torch.py and diff_coreml.py: one self-contained index.html (plots embedded
as base64 PNGs, also kept beside it) showing the largest activation per layer before and after the
rotation, the disagreement per token in one small panel per evaluation text (delimiter tokens marked, the
worst token named), the texts with their worst tokens highlighted, the metrics and the pass/fail gates.

Knows plots and HTML, nothing of models or command lines. matplotlib is imported here only, lazily,
and draws with Agg in a fixed style, so the same data give the same bytes.
"""
import base64
import html
import io
import re
from pathlib import Path

import numpy as np

from modernbert_ane.output_files import publish, staging_folder
from modernbert_ane.user_errors import UserError, writing

FLOAT16_MAX = 65504.0                          # as model.FLOAT16_MAX (not imported: this module needs no torch)
PLOTS = {"activations": "activations.png", "disagreement": "kl_per_token.png"}
REPORT_FILES = ("index.html", *PLOTS.values())
# measure -> (its short name, the axis label); the reference is float32 transformers in both scripts
MEASURES = {"kl": ("KL", "KL(transformers ‖ ours), nats"),
            "cosine": ("1 − cosine", "1 − cosine(transformers, ours)"),
            "score": ("|score error|", "|score − transformers' score|")}
PANEL_COLUMNS = 3                              # small multiples: texts per row of panels
SHADES = 5                                     # token highlight levels: one per decade below the worst error
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf"]
STYLE = {"font.family": "DejaVu Sans", "font.size": 9, "axes.grid": True, "grid.alpha": 0.3,
         "axes.spines.top": False, "axes.spines.right": False, "legend.frameon": False, "savefig.dpi": 100}


# ----------------------------------------------------------------------------- the folder

def check_report_folder(path: str | None, force: bool) -> None:
    """What a report folder needs beyond cli.check_output_path's rules (the scripts check both,
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
                 n_layers: int, texts: list[dict], measure: str, pooled: bool, output_measure: str | None = None,
                 gates: list[dict] = (), notes: list[str] = (), placement: dict | None = None,
                 force: bool = False) -> None:
    """Write the report folder atomically (a temporary folder beside it, renamed into place).

    facts: what was compared, label -> value. peaks: series label -> {name: largest |value|}, names as
    model.py's probes ("embeddings...", "layers.3...", anything else counts as the head). texts: per evaluation
    text, "values" (one error per token, by `measure`: "kl", "cosine" (1 - cosine) or "score"), with "tokens"
    (strings) and "delimiter" (bools) when known; for pooled tasks "output" (the text's error by
    `output_measure`), and "values" only when the script measured the encoder per token. gates: evaluation's
    gate_results, shown as pass/fail. placement: compute units -> coreml/placement.py's placement_summary() of Core ML's
    compute plan, shown as a section when given."""
    check_report_folder(path, force)
    folder = Path(path)
    layers = layer_labels(n_layers)
    output_measure = output_measure or measure
    series = {label: peaks_per_layer(values, n_layers) for label, values in peaks.items()}
    images = {"activations": activations_png(layers, series),
              "disagreement": disagreement_png(texts, measure, pooled, output_measure)}
    page = render_page(title, facts, metrics, layers, series, images, texts, measure, pooled, output_measure,
                       gates, notes, placement)
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


def worst_index(values: np.ndarray) -> int:
    """The row with the largest error, a non-finite one first."""
    return int(np.argmax(np.where(np.isfinite(values), values, np.inf)))


def per_token(texts: list[dict]) -> bool:
    return all("values" in t for t in texts)


def smallest_positive(arrays, default: float) -> float:
    positive = [a[np.isfinite(a) & (a > 0)] for a in arrays]
    positive = np.concatenate(positive) if positive else np.array([])
    return float(positive.min()) if positive.size else default


# ----------------------------------------------------------------------------- plots

def new_figure(height: float = 3.8):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(8.4, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png_bytes(draw, *args, height: float = 3.8) -> bytes:
    """Draw with the fixed style and return the PNG (no software or date in its metadata)."""
    import matplotlib.style
    with matplotlib.style.context("default"), matplotlib.rc_context(STYLE):
        fig = new_figure(height)
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


def plotted(values: list[np.ndarray]) -> tuple[list[np.ndarray], float, float]:
    """Values for a log axis: non-finite ones drawn a decade above the largest finite one; (values, that
    height, the axis floor)."""
    high = max([float(v[np.isfinite(v)].max()) for v in values if np.isfinite(v).any()] or [1.0])
    nonfinite_at = max(high, 1e-12) * 10
    floor = smallest_positive(values, 1e-16) / 2
    return [log_scale_values(np.where(np.isfinite(v), v, nonfinite_at), floor) for v in values], nonfinite_at, floor


def plain_text(token: str, limit: int = 16) -> str:
    """A token as matplotlib text: '$' would start mathtext; long pieces shortened."""
    token = token if len(token) <= limit else token[:limit - 1] + "…"
    return token.replace("$", r"\$")


def draw_text_bars(fig, outputs: list[float], measure: str) -> None:
    """Pooled outputs without per-token values: one bar per text."""
    ax = fig.subplots()
    (values,), nonfinite_at, floor = plotted([np.array(outputs, dtype=float)])
    texts = np.arange(1, len(values) + 1)
    ax.bar(texts, values - floor / 2, bottom=floor / 2, color=COLORS[0])
    bad = ~np.isfinite(np.array(outputs, dtype=float))
    ax.plot(texts[bad], np.full(bad.sum(), nonfinite_at), linestyle="none", marker="x", markersize=8, color="#c00000")
    ax.set_xticks(texts)
    ax.set_xlabel("evaluation text (one pooled output each)")
    ax.set_yscale("log")
    ax.set_ylabel(MEASURES[measure][1])


def draw_text_panels(fig, texts: list[dict], measure: str, output_measure: str, pooled: bool) -> None:
    """Small multiples: one panel per text, error per token on a shared log axis, delimiter tokens as orange
    dots, the text's worst token circled in red and named, non-finite rows as red crosses at the top."""
    rows = -(-len(texts) // PANEL_COLUMNS)
    axes = fig.subplots(rows, PANEL_COLUMNS, sharey=True, squeeze=False).ravel()
    values, nonfinite_at, floor = plotted([t["values"] for t in texts])
    for i, (ax, text, shown) in enumerate(zip(axes, texts, values)):
        x = np.arange(len(shown))
        ax.plot(x, shown, linewidth=0.8, color=COLORS[0])
        delimiter = np.asarray(text.get("delimiter", np.zeros(len(x), bool)), bool)
        ax.plot(x[delimiter], shown[delimiter], linestyle="none", marker="o", markersize=3.5, color=COLORS[1])
        bad = ~np.isfinite(text["values"])
        ax.plot(x[bad], np.full(bad.sum(), nonfinite_at), linestyle="none", marker="x", markersize=7, color="#c00000")
        w = worst_index(text["values"])
        ax.plot([w], [shown[w]], linestyle="none", marker="o", markersize=8, markerfacecolor="none",
                markeredgecolor="#c00000", markeredgewidth=1.3)
        if text.get("tokens"):
            ax.annotate(plain_text(text["tokens"][w]), (w, shown[w]), xytext=(4, 3), textcoords="offset points",
                        fontsize=7.5, color="#c00000")
        title = f"text {i + 1}, {len(x)} tokens"
        if pooled and text.get("output") is not None:
            title += f"; output {MEASURES[output_measure][0]} {text['output']:.2g}"
        ax.set_title(title, fontsize=8, loc="left")
        ax.tick_params(labelsize=7)
    for ax in axes[len(texts):]:
        ax.set_visible(False)
    axes[0].set_yscale("log")
    axes[0].set_ylim(floor / 2, nonfinite_at * 4)
    fig.supylabel(MEASURES[measure][1] + " per token", fontsize=8)
    fig.supxlabel("token position", fontsize=8)
    fig.legend(handles=legend_handles(), loc="outside upper center", ncols=3, fontsize=8)


def legend_handles():
    from matplotlib.lines import Line2D
    return [Line2D([], [], color=COLORS[0], linewidth=0.8, label="per token"),
            Line2D([], [], linestyle="none", marker="o", markersize=3.5, color=COLORS[1], label="delimiter token"),
            Line2D([], [], linestyle="none", marker="o", markersize=8, markerfacecolor="none",
                   markeredgecolor="#c00000", label="the text's worst token")]


def activations_png(layers: list[str], series: dict[str, np.ndarray]) -> bytes:
    return png_bytes(draw_activations, layers, series)


def disagreement_png(texts: list[dict], measure: str, pooled: bool, output_measure: str) -> bytes:
    if not per_token(texts):
        return png_bytes(draw_text_bars, [t["output"] for t in texts], output_measure)
    rows = -(-len(texts) // PANEL_COLUMNS)
    return png_bytes(draw_text_panels, texts, measure, output_measure, pooled, height=0.6 + 1.55 * rows)


# ----------------------------------------------------------------------------- the page

CSS = """
body { font: 15px/1.45 -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; color: #222; margin: 0; }
main { max-width: 900px; margin: 0 auto; padding: 24px 20px 48px; }
h1 { font-size: 21px; margin: 0 0 12px; } h2 { font-size: 17px; margin: 28px 0 8px; }
h3 { font-size: 14px; margin: 14px 0 4px; font-weight: 600; }
table { border-collapse: collapse; font-size: 14px; }
th, td { text-align: left; padding: 3px 14px 3px 0; border-bottom: 1px solid #e4e4e4; vertical-align: top; }
td.num { font-family: "DejaVu Sans Mono", Menlo, monospace; }
figure { margin: 0; } img { max-width: 100%; height: auto; display: block; }
figcaption, .note { font-size: 13px; color: #555; margin-top: 6px; }
details { margin-top: 8px; font-size: 13px; } summary { cursor: pointer; color: #555; }
.gate { font-weight: 600; padding: 4px 10px; margin: 4px 0; display: inline-block; border-radius: 3px; }
.pass { background: #e3f4e3; color: #1b5e20; } .fail { background: #fde4e4; color: #b00020; }
.tokens { font: 13px/1.9 "DejaVu Sans Mono", Menlo, monospace; margin: 0 0 10px; word-wrap: break-word; }
.tokens span { padding: 1px 2px; border-radius: 2px; }
.s1 { background: #fff3d6; } .s2 { background: #ffe0a3; } .s3 { background: #ffc266; } .s4 { background: #ff9966; }
.d { box-shadow: inset 0 -2px #ff7f0e; } .nf { background: #c00000; color: #fff; }
.w { outline: 2px solid #c00000; font-weight: 700; }
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


def disagreement_caption(texts: list[dict], measure: str, pooled: bool, output_measure: str) -> str:
    if not per_token(texts):
        return (f"{MEASURES[output_measure][1]} for each evaluation text: this task has one pooled output per text, "
                f"so a bar per text replaces the panels along the sequence. Log scale; a red cross marks a non-finite "
                f"output.")
    what = MEASURES[measure][1] + (" of the encoder output (final norm), which the pooling reads" if pooled else "")
    return (f"{what}, at each token position: one panel per evaluation text (padding left out), on a shared log "
            f"scale. Orange dots are delimiter tokens, the red circle is the text's worst token (named); zero is "
            f"drawn at the bottom, a red cross marks a non-finite output.")


def gates_html(gates: list[dict]) -> list[str]:
    return [f'<p class="gate {"pass" if g["passed"] else "fail"}">{"PASS" if g["passed"] else "FAIL"}: '
            f'{esc(g["metric"])} {esc(format_value(g["value"]))} {"≤" if g["passed"] else "exceeds"} '
            f'{esc(g["flag"])} {esc(format_value(g["limit"]))}</p>' for g in gates]


def row_words(row: dict, measure: str) -> str:
    """A worst_token / worst_text entry of the metrics, in words."""
    where = f"text {row['text']}"
    if "position" in row:
        where = f"“{row['token']}” (text {row['text']}, position {row['position']}" + \
                (", a delimiter token)" if row.get("delimiter") else ")")
    value = {"kl": ("kl", "KL"), "cosine": ("cosine", "cosine"), "score": ("abs_error", "|score error|")}[measure]
    shown = row.get(value[0])
    return where + (f": {value[1]} {format_value(shown)}" if shown is not None else "")


def split_html(metrics: dict) -> list[str]:
    """The metrics' nested parts: delimiter vs ordinary tokens, the worst token / text, the [CLS] row."""
    parts = []
    if "delimiter_tokens" in metrics:
        groups = [("delimiter tokens", metrics["delimiter_tokens"]), ("ordinary tokens", metrics["ordinary_tokens"])]
        keys = [k for k in dict.fromkeys(k for _, g in groups for k in g) if k != "tokens"]
        parts += [f"<h3>Delimiter and ordinary tokens ({esc(metrics['token_measure'])} of the "
                  f"{esc(metrics['token_output'])})</h3>",
                  html_table(["", "tokens", *keys], [[name, g["tokens"], *(g.get(k, "") for k in keys)]
                                                     for name, g in groups]),
                  f'<p class="note">Delimiter tokens: {esc(metrics["delimiter_rule"])}.</p>',
                  f"<p>Worst token: <b>{esc(row_words(metrics['worst_token'], metrics['token_measure']))}</b></p>"]
    if "worst_text" in metrics:
        measure = next(m for m, key in (("kl", "kl"), ("score", "abs_error"), ("cosine", "cosine"))
                       if key in metrics["worst_text"])
        parts.append(f"<p>Worst text (pooled output): <b>{esc(row_words(metrics['worst_text'], measure))}</b></p>")
    if "cls_row" in metrics:
        cls = metrics["cls_row"]
        parts.append(f"<p>[CLS] row of the encoder output (what cls pooling reads): cosine_min "
                     f"{esc(format_value(cls['cosine_min']))}, cosine_mean {esc(format_value(cls['cosine_mean']))} "
                     f"(lowest in text {esc(cls['worst_text'])})</p>")
    return parts


def shade(value: float, worst: float) -> str:
    """The highlight class of a token's error: s4 within a decade of the worst error, s1 three decades below, none
    further down; nf when not finite."""
    if not np.isfinite(value):
        return "nf"
    if worst <= 0 or value <= 0:
        return ""
    level = min(SHADES - 1, SHADES + int(np.floor(np.log10(value / worst))))   # (0.1, 1] of the worst -> s4
    return f"s{level}" if level >= 1 else ""


def texts_html(texts: list[dict], measure: str) -> list[str]:
    """Each text as its tokens, shaded by their error, delimiters underlined, the worst token outlined."""
    if not per_token(texts) or not all(t.get("tokens") for t in texts):
        return []
    finite = [v[np.isfinite(v)] for t in texts for v in [t["values"]]]
    worst_all = max([float(f.max()) for f in finite if f.size] or [0.0])
    short = MEASURES[measure][0]
    parts = ["<h2>The texts, worst tokens highlighted</h2>",
             f'<p class="note">Each token shaded by its {esc(short)}: darkest within a decade of the worst token of '
             f'all texts, lighter a decade further down each step, unshaded below; delimiter tokens underlined in '
             f'orange, each text\'s worst token outlined in red (hover a token for its value).</p>']
    for i, t in enumerate(texts):
        w = worst_index(t["values"])
        delimiter = np.asarray(t.get("delimiter", np.zeros(len(t["values"]), bool)), bool)
        spans = []
        for j, (token, value) in enumerate(zip(t["tokens"], t["values"])):
            classes = " ".join(c for c in (shade(float(value), worst_all), "d" if delimiter[j] else "",
                                           "w" if j == w else "") if c)
            spans.append(f'<span class="{classes}" title="{j}: {esc(short)} {float(value):.3g}">{esc(token)}</span>'
                         if classes else f'<span title="{j}: {esc(short)} {float(value):.3g}">{esc(token)}</span>')
        parts += [f"<h3>text {i + 1} ({len(t['values'])} tokens): worst token “{esc(t['tokens'][w])}” at position "
                  f"{w}, {esc(short)} {esc(format_value(float(t['values'][w])))}</h3>",
                  f'<p class="tokens">{" ".join(spans)}</p>']
    return parts


def text_table(texts: list[dict], measure: str, pooled: bool, output_measure: str) -> str:
    header, rows = ["text"], []
    if pooled:
        header.append(f"output {MEASURES[output_measure][0]}")
    if per_token(texts):
        header += ["tokens", "mean", "max", "worst token", "position"]
    for i, t in enumerate(texts):
        row = [i + 1] + ([float(t["output"])] if pooled else [])
        if per_token(texts):
            v, w = t["values"], worst_index(t["values"])
            row += [len(v), float(np.mean(v)), float(np.max(v)), t["tokens"][w] if t.get("tokens") else "", w]
        rows.append(row)
    return html_table(header, rows)


def scalar_metrics(metrics: dict) -> list[list]:
    """The metrics table: single values (the per-token parts are split_html's)."""
    shown_elsewhere = ("token_measure", "token_output", "delimiter_rule")
    return [[k, v] for k, v in metrics.items() if not isinstance(v, (dict, list)) and k not in shown_elsewhere]


def percent(share: float | None) -> str:
    return "n/a" if share is None else f"{100 * share:.1f} %"


def placement_html(placement: dict | None) -> list[str]:
    """The compute plan's section: per compute-unit setting, the Neural Engine's share of ops and of FLOPs, the
    ops per device, and the ops placed elsewhere grouped by type (mlpackage.placement_summary's fields)."""
    if not placement:
        return []
    parts = ["<h2>Where Core ML runs the ops (compute plan)</h2>",
             '<p class="note">From Core ML\'s compute plan (MLComputePlan, macOS 14.4+): the device it prefers for '
             "each non-constant op. FLOPs are this project's count of each op (coreml/cost.py), matched by the op's "
             "output name.</p>"]
    for units, s in placement.items():
        devices = ", ".join(f"{device} {n}" for device, n in s["ops_by_device"].items())
        parts += [f"<h3>compute units {esc(units)}: {esc(percent(s['neural_engine_op_share']))} of ops, "
                  f"{esc(percent(s['neural_engine_flop_share']))} of FLOPs on the Neural Engine</h3>",
                  html_table(["ops", "on the Neural Engine: ops", "on the Neural Engine: FLOPs", "ops per device"],
                             [[s["ops"], percent(s["neural_engine_op_share"]),
                               percent(s["neural_engine_flop_share"]), devices]])]
        if not s["fallbacks"]:
            parts.append("<p>Every op runs on the Neural Engine.</p>")
            continue
        parts.append(html_table(["off the Neural Engine: op type", "ops", "devices", "GFLOP", "e.g."],
                                [[op_type, g["count"], ", ".join(f"{d} {n}" for d, n in sorted(g["devices"].items())),
                                  g["flops"] / 1e9, ", ".join(g["examples"])] for op_type, g in s["fallbacks"].items()]))
    return parts


def render_page(title, facts, metrics, layers, series, images, texts, measure, pooled, output_measure, gates,
                notes, placement=None) -> str:
    peak_rows = [[layer, *(float(v[i]) for v in series.values())] for i, layer in enumerate(layers)]
    short, label = MEASURES[measure]
    if per_token(texts):
        heading = f"{short} per token, one panel per text" + (" (the encoder output)" if pooled else "")
    else:
        heading = f"{MEASURES[output_measure][0]} per text"
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
        "style-src 'unsafe-inline'\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{CSS}</style></head>",
        "<body><main>",
        f"<h1>{esc(title)}</h1>",
        *gates_html(gates),
        *(f'<p class="note">{esc(note)}</p>' for note in notes),
        html_table(["compared", ""], [[k, v] for k, v in facts.items()]),
        "<h2>Metrics</h2>",
        html_table(["metric", "value"], scalar_metrics(metrics)),
        '<p class="note">Over the built-in evaluation texts: their non-padding tokens, or one row per text for '
        f'pooled tasks{"; KL in nats per token" if output_measure == "kl" else ""}.</p>',
        *split_html(metrics),
        *placement_html(placement),
        "<h2>Largest activation per layer, before and after the rotation</h2>",
        figure_html(images["activations"], "largest absolute activation per layer", activations_caption(series)),
        "<details><summary>the values</summary>", html_table(["layer", *series], peak_rows), "</details>",
        f"<h2>{esc(heading)}</h2>",
        figure_html(images["disagreement"], f"{label}, {heading}",
                    disagreement_caption(texts, measure, pooled, output_measure)),
        "<details><summary>per text</summary>", text_table(texts, measure, pooled, output_measure), "</details>",
        *texts_html(texts, measure),
        "</main></body></html>",
        ""])
