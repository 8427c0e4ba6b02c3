"""diff_coreml.py: a converted package against transformers, with the emulator."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import convert
import diff_coreml
from checkpoints import build_sentence_transformers
from user_errors import run_cli

ROOT = Path(__file__).resolve().parent.parent


def run(main, argv, capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(main, [str(a) for a in argv])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.fixture(scope="module")
def package(checkpoint_factory, tmp_path_factory):
    out = tmp_path_factory.mktemp("pkg") / "tiny.mlpackage"
    with pytest.raises(SystemExit):
        run_cli(convert.main, [str(checkpoint_factory("tiny")), "--seq-len", "32", "128", "-o", str(out)])
    return out


def test_package_matches_transformers(package, tmp_path, capsys):
    path = tmp_path / "m.json"
    code, out, err = run(diff_coreml.main, [package, "--json", path, "--backend", "emulate"], capsys)
    assert code == 0 and "float16 emulator" in err
    m = json.loads(path.read_text())
    assert {"kl_mean", "kl_max", "top1_agreement", "top5_agreement", "max_abs_diff", "nonfinite",
            "overflow_count", "first_overflow"} <= set(m)
    assert m["top1_agreement"] >= 0.99 and m["nonfinite"] == 0 and m["backend"] == "emulate"
    assert {row["length"] for row in m["texts"]} == {32, 128}            # short texts use the short length


def test_report_plots_the_package_per_layer(package, tmp_path, capsys):
    folder = tmp_path / "report"
    code, out, _ = run(diff_coreml.main, [package, "--backend", "emulate", "--report", folder], capsys)
    page = (folder / "index.html").read_text()
    assert code == 0 and page.count('<img src="data:image/png;base64,') == 2
    assert "before rotation: model.py unrotated, float32" in page
    assert "after rotation (hadamard): this package, float16 emulator" in page


def test_package_ops_are_grouped_per_layer():
    """Op names carry no module names: layers are told apart by their four convs, in the order ops ran."""
    watch = diff_coreml.OverflowWatch()
    ops = [("gather", 1), ("layer_norm", 30001), ("conv", 9), ("greater", 1)]                  # embeddings
    for layer in range(2):
        ops += [("rsqrt", 2), ("conv", 3), ("softmax", 1), ("conv", 4), ("add", 5), ("conv", 6), ("gelu", 7),
                ("conv", 8), ("add", 10 + layer)]
    ops += [("layer_norm", 40), ("conv", 50)]                                                   # head
    for i, (kind, peak) in enumerate(ops):
        watch.observe(f"op_{i}", kind, np.array([peak], dtype=np.float32))
    assert watch.layer_peaks(2, embedding_convs=1) == {"embeddings": 30001, "layers.0": 10, "layers.1": 11,
                                                        "head": 50}
    assert watch.layer_peaks(2, embedding_convs=0)["embeddings"] == 30001


def test_max_kl_fails_above_threshold(package, capsys):
    code, _, err = run(diff_coreml.main, [package, "--max-kl", "1e-12"], capsys)
    assert code == 1 and "exceeds --max-kl" in err


def test_embedding_package_cosine(tmp_path, capsys):
    folder = build_sentence_transformers(tmp_path / "st", "tiny", "mean", 32, True)
    out = tmp_path / "st.mlpackage"
    assert run(convert.main, [folder, "--seq-len", "64", "-o", out], capsys)[0] == 0
    path = tmp_path / "e.json"
    assert run(diff_coreml.main, [out, "--json", path], capsys)[0] == 0
    m = json.loads(path.read_text())
    assert m["cosine_min"] >= 0.999 and m["cosine_mean"] >= 0.999 and m["nonfinite"] == 0


def test_bad_inputs_get_one_line(package, checkpoint_factory, tmp_path):
    not_package = tmp_path / "folder.mlpackage"
    not_package.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cases = {
        "missing": ([str(tmp_path / "nope.mlpackage")], "no such package"),
        "not a package": ([str(not_package)], "is not an .mlpackage"),
        "model mismatch": ([str(package), "--model", str(checkpoint_factory("odd"))], "does not match"),
    }
    for name, (argv, message) in cases.items():
        result = subprocess.run([sys.executable, str(ROOT / "diff_coreml.py"), *argv], capture_output=True,
                                text=True, env=env, cwd=tmp_path)
        lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0], (name, result.stderr)
        assert "Traceback" not in result.stderr
