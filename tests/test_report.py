"""report.py: the --report page, its folder, and what headless Chromium shows of it."""
import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from modernbert_ane import report
from modernbert_ane.user_errors import UserError

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_APPS = ("/Applications/Chromium.app/Contents/MacOS/Chromium",
                 "/Applications/Google Chrome.app/Contents/MacOS/Google Chrome")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]
METRICS = {"kl_mean": 1.5e-05, "top1_agreement": 0.987654, "overflow_count": 3,
           "first_overflow": "layers.0.mlp_norm.square"}


def sample(n_layers=3, pooled=False, measure="kl", tokens=True):
    """Report data shaped like diff_torch's: an unrotated model that overflows, a rotated one that does not;
    per text its errors per token (pooled: its output's, with the encoder's per token unless tokens=False)."""
    rng = np.random.default_rng(0)
    before = {"embeddings.norm.square": 1.0, "embeddings": 3e4, "logits": 20.0}
    for i in range(n_layers):
        before.update({f"layers.{i}": 3e4, f"layers.{i}.mlp_norm.square": float("inf")})
    after = {"embeddings": 8672.0, **{f"layers.{i}": 8000.0 + i for i in range(n_layers)}, "final_norm": 3.0}
    texts = []
    for i, n in enumerate([9, 14, 120, 31]):
        values = np.abs(rng.normal(size=n)) * 1e-5
        values[-1] = 1e-3 * (i + 1)                                 # the [SEP] of each text is its worst token
        names = ["[CLS]", *(f"w{i}_{j}" for j in range(1, n - 1)), "[SEP]"]
        delimiter = np.isin(np.arange(n), [0, n - 1])
        text = {"values": values, "tokens": names, "delimiter": delimiter} if tokens else {}
        texts.append({**text, "output": float(np.abs(rng.normal()) * 1e-5)} if pooled else text)
    if tokens:
        texts[1]["values"][3] = np.inf                              # a non-finite output
        texts[1]["tokens"][3] = "<b>$x$"                            # escaped in the page, no mathtext in the plot
    else:
        texts[1]["output"] = np.inf
    metrics = dict(METRICS, delimiter_tokens={"tokens": 8, "kl_mean": 2e-3}, ordinary_tokens={"tokens": 166,
                   "kl_mean": 1e-5}, worst_token={"text": 2, "position": 3, "token": "<b>$x$", "delimiter": False,
                                                 "kl": float("inf")}, token_measure=measure, token_output="task output",
                   delimiter_rule="[CLS]/[SEP] and massive tokens")
    return dict(title="diff_torch: <ckpt> & co", facts={"checkpoint": "/tmp/<ckpt>", "command": "python x.py"},
                metrics=metrics, peaks={"before rotation": before, "after rotation (hadamard)": after},
                n_layers=n_layers, texts=texts, measure=measure, pooled=pooled)


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("written") / "report"
    report.write_report(str(folder), **sample())
    return folder


def test_page_embeds_both_plots_and_the_metrics(written):
    folder = written
    assert sorted(p.name for p in folder.iterdir()) == sorted(report.REPORT_FILES)
    page = (folder / "index.html").read_text()
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 2
    assert [base64.b64decode(i) for i in images] == [(folder / n).read_bytes() for n in report.PLOTS.values()]
    for name, shown in zip(METRICS, ["1.5e-05", "0.9877", "3", "layers.0.mlp_norm.square"]):
        assert re.search(f"<td>{name}</td><td[^>]*>{re.escape(shown)}</td>", page), name
    assert "&lt;ckpt&gt; &amp; co" in page and "<ckpt>" not in page                       # escaped
    assert not re.search(r'(src|href)="(?!data:)', page)                                    # nothing fetched


def test_placement_section_shows_shares_and_fallbacks_by_type(tmp_path):
    """Synthetic compute-plan records through coreml/placement.py's placement_summary (what diff_coreml.py passes) into the
    page: the Neural Engine's share of ops and of FLOPs, ops per device, each fallback type with its devices."""
    from modernbert_ane.coreml.placement import placement_summary
    from test_placement import PLACEMENT_RECORDS
    summary = placement_summary(PLACEMENT_RECORDS, {"qkv": 6e9, "scores": 2e9, "probs": 2e9})
    report.write_report(str(tmp_path / "r"), **sample(), placement={"cpu-and-ne": summary, "all": summary})
    page = (tmp_path / "r" / "index.html").read_text()
    assert "<h2>Where Core ML runs the ops (compute plan)</h2>" in page
    assert page.count("of FLOPs on the Neural Engine</h3>") == 2
    assert "<h3>compute units cpu-and-ne: 40.0 % of ops, 80.0 % of FLOPs on the Neural Engine</h3>" in page
    assert "<td>cpu 2, gpu 1, neural_engine 2</td>" in page
    assert re.search(r"<td>gather</td><td[^>]*>2</td><td>cpu 1, gpu 1</td><td[^>]*>0</td><td>emb, emb_&lt;2&gt;</td>",
                     page)
    assert re.search(r"<td>softmax</td><td[^>]*>1</td><td>cpu 1</td><td[^>]*>2</td><td>probs</td>", page)
    assert page.index("<td>gather</td>") < page.index("<td>softmax</td>")          # most ops first
    section = "\n".join(report.placement_html({"cpu-and-ne": placement_summary(PLACEMENT_RECORDS[:2], {})}))
    assert "Every op runs on the Neural Engine." in section and "100.0 % of ops, n/a of FLOPs" in section
    assert report.placement_html(None) == [] and report.placement_html({}) == []        # no plan: no section


def test_peaks_are_grouped_per_layer_by_probe_name():
    peaks = report.peaks_per_layer({"embeddings.norm.square": 2.0, "embeddings": 1.0, "layers.1.mlp_norm.square":
                                     np.inf, "layers.10": 5.0, "layers.1": 3.0, "logits": 7.0}, n_layers=11)
    assert peaks[0] == 2.0 and np.isinf(peaks[2]) and peaks[11] == 5.0 and peaks[12] == 7.0
    assert np.isnan(peaks[1]) and np.isnan(peaks[3])


def test_same_data_same_bytes(tmp_path):
    for name in ("a", "b"):
        report.write_report(str(tmp_path / name), **sample(pooled=True, measure="cosine", tokens=False))
    for file in report.REPORT_FILES:
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes(), file
    assert "one pooled output per text" in (tmp_path / "a" / "index.html").read_text()


def png_size(png: bytes) -> tuple[int, int]:
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def test_one_panel_per_text_and_the_worst_tokens_named(written):
    page = (written / "index.html").read_text()
    # small multiples: the figure grows with the rows of panels (4 texts: 2 rows of 3), not one crowded axis
    assert png_size((written / "kl_per_token.png").read_bytes())[1] == round(100 * (0.6 + 1.55 * 2))
    assert "one panel per evaluation text" in page
    for i, n in enumerate([9, 14, 120, 31]):
        if i != 1:
            assert f"text {i + 1} ({n} tokens): worst token “[SEP]” at position {n - 1}" in page
    assert "text 2 (14 tokens): worst token “&lt;b&gt;$x$” at position 3" in page        # non-finite first
    assert page.count('class="nf w"') == 1 and page.count('class="s4 d w"') == 3     # 1e-3..4e-3: a decade
    assert page.count(' d"') + page.count(' d ') + page.count('"d"') >= 6                  # delimiters marked
    assert "Worst token: <b>“&lt;b&gt;$x$” (text 2, position 3): KL inf</b>" in page
    assert re.search(r"<td>delimiter tokens</td><td[^>]*>8</td>", page)


@pytest.mark.parametrize("passed", [True, False])
def test_gates_are_marked_pass_or_fail(tmp_path, passed):
    gate = {"flag": "--max-kl", "metric": "kl_mean", "limit": 1e-3 if passed else 1e-6, "value": 1.5e-5,
            "passed": passed}
    report.write_report(str(tmp_path / "r"), **sample(), gates=[gate])
    page = (tmp_path / "r" / "index.html").read_text()
    mark = ('<p class="gate pass">PASS: kl_mean 1.5e-05 ≤ --max-kl 0.001</p>' if passed else
            '<p class="gate fail">FAIL: kl_mean 1.5e-05 exceeds --max-kl 1e-06</p>')
    assert mark in page and page.count('class="gate') == 1


def test_pooled_panels_show_the_encoder_per_token_and_the_output_per_text(tmp_path):
    report.write_report(str(tmp_path / "r"), **sample(pooled=True, measure="cosine"), output_measure="kl")
    page = (tmp_path / "r" / "index.html").read_text()
    assert "1 − cosine per token, one panel per text (the encoder output)" in page
    assert "<th>output KL</th>" in page and "worst token “[SEP]”" in page


def test_shades_are_decades_below_the_worst():
    assert [report.shade(v, 1.0) for v in (1.0, 0.5, 0.05, 5e-3, 5e-4, 5e-5, 0.0, np.inf)] == \
        ["s4", "s4", "s3", "s2", "s1", "", "", "nf"]


def test_existing_folder_needs_force_and_failures_leave_nothing(tmp_path, monkeypatch):
    folder = tmp_path / "report"
    folder.mkdir()
    with pytest.raises(UserError, match="--force"):
        report.write_report(str(folder), **sample())
    report.write_report(str(folder), **sample(), force=True)                # an empty folder is replaced
    report.write_report(str(folder), **sample(n_layers=2), force=True)     # and so is a previous report
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a report"):
        report.write_report(str(folder), **sample(), force=True)
    assert (folder / "notes.txt").read_text() == "mine"
    with pytest.raises(UserError, match="not a folder"):
        report.check_report_folder(str(folder / "notes.txt"), force=True)
    with pytest.raises(UserError, match="does not exist"):
        report.check_report_folder(str(tmp_path / "no" / "report"), force=False)
    monkeypatch.setattr(report, "publish", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):                    # fails after writing the files: nothing is left
        report.write_report(str(tmp_path / "broken"), **sample())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def test_matplotlib_is_imported_only_when_drawing():
    code = "import sys, modernbert_ane.report; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(report.__file__).resolve().parents[1])


def find_chromium() -> str | None:
    """Chromium or Chrome: on PATH, or the macOS application."""
    found = [shutil.which(name) for name in CHROMIUM_NAMES] + [app for app in CHROMIUM_APPS if Path(app).is_file()]
    return next((path for path in found if path), None)


def chromium(tmp_path, *args) -> str:
    browser = find_chromium()
    if browser is None:
        pytest.skip(f"no Chromium to render the page: none of {', '.join(CHROMIUM_NAMES)} on PATH, nor "
                    f"{' or '.join(CHROMIUM_APPS)} (apt-get install -y --no-install-recommends chromium; "
                    f".ci/run installs it)")
    result = subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_chromium_is_found_on_path(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "chromium-browser"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake.parent))
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM_APPS", ())
    assert find_chromium() == str(fake)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_chromium() is None


def test_images_render_in_headless_chromium(written, tmp_path):
    folder = written
    page = (folder / "index.html").read_text()
    # a copy with a script that writes each image's decoded width into the page (the page itself allows no script)
    script = ("<script>addEventListener('load', () => { const out = document.createElement('pre'); out.id = 'widths'; "
              "out.textContent = JSON.stringify([...document.images].map(i => i.complete && i.naturalWidth)); "
              "document.body.append(out); })</script>")
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("default-src 'none';", "default-src 'none'; script-src 'unsafe-inline';")
                     .replace("</body>", script + "</body>"))
    dom = chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    widths = json.loads(re.search(r'<pre id="widths">(.*?)</pre>', dom)[1])
    assert len(widths) == 2 and all(w and w > 0 for w in widths), widths

    shot = tmp_path / "shot.png"
    chromium(tmp_path, "--window-size=1000,1600", f"--screenshot={shot}", (folder / "index.html").as_uri())
    import matplotlib.image
    rgb = matplotlib.image.imread(shot)[..., :3]
    assert (rgb < 0.9).any(axis=-1).mean() > 0.01, "the screenshot is blank"
    colored = (rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.3          # the plots, and highlighted tokens
    assert colored.mean() > 0.002, "no plot is visible in the screenshot"
