"""report.py: the --report page, its folder, and what headless Chromium shows of it."""
import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import report
from user_errors import UserError

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]
METRICS = {"kl_mean": 1.5e-05, "top1_agreement": 0.987654, "overflow_count": 3,
           "first_overflow": "layers.0.mlp_norm.square"}


def sample(n_layers=3, pooled=False, measure="kl"):
    """Report data shaped like diff_torch's: an unrotated model that overflows, a rotated one that does not."""
    rng = np.random.default_rng(0)
    before = {"embeddings.norm.square": 1.0, "embeddings": 3e4, "logits": 20.0}
    for i in range(n_layers):
        before.update({f"layers.{i}": 3e4, f"layers.{i}.mlp_norm.square": float("inf")})
    after = {"embeddings": 8672.0, **{f"layers.{i}": 8000.0 + i for i in range(n_layers)}, "final_norm": 3.0}
    lengths = [1] * 4 if pooled else [9, 14, 120, 31]
    disagreement = [np.abs(rng.normal(size=n)) * 1e-5 for n in lengths]
    disagreement[1][0] = np.inf                                    # a non-finite output
    return dict(title="diff_torch: <ckpt> & co", facts={"checkpoint": "/tmp/<ckpt>", "command": "python x.py"},
                metrics=METRICS, peaks={"before rotation": before, "after rotation (hadamard)": after},
                n_layers=n_layers, disagreement=disagreement, measure=measure, pooled=pooled)


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


def test_peaks_are_grouped_per_layer_by_probe_name():
    peaks = report.peaks_per_layer({"embeddings.norm.square": 2.0, "embeddings": 1.0, "layers.1.mlp_norm.square":
                                     np.inf, "layers.10": 5.0, "layers.1": 3.0, "logits": 7.0}, n_layers=11)
    assert peaks[0] == 2.0 and np.isinf(peaks[2]) and peaks[11] == 5.0 and peaks[12] == 7.0
    assert np.isnan(peaks[1]) and np.isnan(peaks[3])


def test_same_data_same_bytes(tmp_path):
    for name in ("a", "b"):
        report.write_report(str(tmp_path / name), **sample(pooled=True, measure="cosine"))
    for file in report.REPORT_FILES:
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes(), file
    assert "one pooled output per text" in (tmp_path / "a" / "index.html").read_text()


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
    code = "import sys, report; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(report.__file__).parent)


def chromium(tmp_path, *args) -> str:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: the report test needs it (apt-get install -y --no-install-recommends "
                    f"chromium; .ci/run installs it)")
    result = subprocess.run([str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


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
    colored = (rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.3          # the page's own colours are greys: plots only
    assert colored.mean() > 0.002, "no plot is visible in the screenshot"
