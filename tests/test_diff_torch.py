"""diff_torch.py: the report, its JSON, and one-line errors for bad input."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import diff_torch
from user_errors import run_cli

ROOT = Path(__file__).resolve().parent.parent
JSON_KEYS = {"kl_mean", "kl_max", "top1_agreement", "top5_agreement", "max_abs_diff", "nonfinite",
             "overflow_count", "first_overflow"}


def run_main(argv, capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(diff_torch.main, argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.mark.parametrize("config", ["tiny", "biased"])
def test_float32_parity_report_and_json(checkpoint_factory, tmp_path, capsys, config):
    path = tmp_path / "m.json"
    code, out, _ = run_main([str(checkpoint_factory(config)), "--json", str(path)], capsys)
    assert code == 0
    metrics = json.loads(path.read_text())
    assert JSON_KEYS <= set(metrics)
    assert metrics["max_abs_diff"] <= 1e-4 and metrics["top1_agreement"] == 1.0 and metrics["nonfinite"] == 0
    assert metrics["kl_max"] < 1e-9 and metrics["top5_agreement"] == 1.0
    for module in ("embeddings", "(global)", "(local)", "encoder", "head"):
        assert module in out
    assert "largest absolute activation per layer" in out
    assert len(metrics["layers"]) == 1 + len(json.loads((checkpoint_factory(config) / "config.json").read_text())
                                               ["layer_types"])


def test_unrotated_float32_parity(checkpoint_factory, tmp_path, capsys):
    path = tmp_path / "m.json"
    code, _, _ = run_main([str(checkpoint_factory("odd")), "--rotation", "none", "--json", str(path)], capsys)
    assert code == 0 and json.loads(path.read_text())["max_abs_diff"] <= 1e-4


def test_existing_json_needs_force(checkpoint_factory, tmp_path, capsys):
    path = tmp_path / "m.json"
    path.write_text("keep")
    code, _, err = run_main([str(checkpoint_factory()), "--json", str(path)], capsys)
    assert code == 2 and "--force" in err and path.read_text() == "keep"


def test_report_shows_both_models(checkpoint_factory, tmp_path, capsys):
    folder = tmp_path / "report"
    code, out, _ = run_main([str(checkpoint_factory()), "--report", str(folder)], capsys)
    page = (folder / "index.html").read_text()
    assert code == 0 and f"wrote {folder}/index.html" in out
    assert page.count('<img src="data:image/png;base64,') == 2 and (folder / "activations.png").is_file()
    assert "before rotation: model.py unrotated, float32" in page and "after rotation (hadamard)" in page
    assert "KL per token" in page and "top1_agreement" in page
    code, _, err = run_main([str(checkpoint_factory()), "--report", str(folder)], capsys)      # refused at once
    assert code == 2 and "--force" in err
    code, _, err = run_main([str(checkpoint_factory()), "--report", str(checkpoint_factory() / "r")], capsys)
    assert code == 2 and "inside the input" in err


def bad_checkpoints(source, tmp_path):
    other = tmp_path / "other-type"
    shutil.copytree(source, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["model_type"] = "bert"
    (other / "config.json").write_text(json.dumps(cfg))
    truncated = tmp_path / "truncated"
    shutil.copytree(source, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return {"missing": (str(tmp_path / "nope"), "no such checkpoint folder"),
            "other model type": (str(other), "only 'modernbert' is supported"),
            "truncated weights": (str(truncated), "truncated or damaged"),
            "hub offline": ("answerdotai/ModernBERT-base", "pass a local checkpoint folder")}


def test_bad_input_gets_one_line_and_no_traceback(checkpoint_factory, tmp_path):
    """As a user runs it: a real process, so nothing of pytest hides a traceback."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for name, (arg, message) in bad_checkpoints(checkpoint_factory(), tmp_path).items():
        result = subprocess.run([sys.executable, str(ROOT / "diff_torch.py"), arg, "--json", str(tmp_path / "x.json")],
                                capture_output=True, text=True, env=env, cwd=tmp_path)
        lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
        assert result.returncode == 2, (name, result.stderr)
        assert len(lines) == 1 and message in lines[0], (name, result.stderr)
        assert "Traceback" not in result.stderr, name
        assert not (tmp_path / "x.json").exists()
