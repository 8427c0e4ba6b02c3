"""diff_torch.py: the report, its JSON, and one-line errors for bad input."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from modernbert_ane import diff_torch
from modernbert_ane.evaluation import EVAL_TEXTS
from checkpoints import build_tokenizer
from modernbert_ane.user_errors import run_cli

ROOT = Path(__file__).resolve().parent.parent
JSON_KEYS = {"kl_mean", "kl_max", "top1_agreement", "top5_agreement", "max_abs_diff", "nonfinite",
             "overflow_count", "first_overflow", "delimiter_tokens", "ordinary_tokens", "worst_token", "token_output",
             "token_measure", "delimiter_rule", "texts", "gates"}


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


def json_run(argv, tmp_path, capsys, name="m.json"):
    path = tmp_path / name
    code, out, err = run_main([*map(str, argv), "--json", str(path), "--force"], capsys)
    return code, (json.loads(path.read_text()) if path.exists() else None), out, err


def assert_names_its_token(row: dict):
    """A worst token's text, position, id and string are those of the evaluation text, tokenized."""
    ids = build_tokenizer()(EVAL_TEXTS[row["text"] - 1])["input_ids"]
    assert ids[row["position"]] == row["token_id"]
    assert build_tokenizer().convert_ids_to_tokens(row["token_id"]) == row["token"]


def test_delimiter_and_ordinary_tokens_of_an_outlier_checkpoint(checkpoint_factory, tmp_path, capsys):
    """[CLS]/[SEP] carry ~3e4 there: they are the delimiter tokens, and unrotated float16 (whose fused LayerNorm
    overflows on them) hurts them most."""
    code, m, out, _ = json_run([checkpoint_factory("tiny", outliers=True), "--precision", "float16",
                                "--rotation", "none"], tmp_path, capsys)
    assert code == 0
    delimiters, ordinary = m["delimiter_tokens"], m["ordinary_tokens"]
    assert delimiters["tokens"] == 2 * len(EVAL_TEXTS) and delimiters["tokens"] + ordinary["tokens"] == m["tokens"]
    assert delimiters["kl_mean"] > 10 * ordinary["kl_mean"] > 0
    assert m["kl_mean"] == pytest.approx((delimiters["kl_mean"] * delimiters["tokens"] +
                                          ordinary["kl_mean"] * ordinary["tokens"]) / m["tokens"])
    worst = m["worst_token"]
    assert worst["kl"] == m["kl_max"] and worst["token"] in ("[CLS]", "[SEP]") and worst["delimiter"]
    assert_names_its_token(worst)
    assert [row["text"] for row in m["texts"]] == list(range(1, len(EVAL_TEXTS) + 1))
    assert max(row["kl_max"] for row in m["texts"]) == m["kl_max"]
    assert f"worst token      text {worst['text']}, position {worst['position']}, '{worst['token']}'" in out


def test_texts_in_bounded_batches_give_the_same_metrics(checkpoint_factory, tmp_path, capsys, monkeypatch):
    """float32 (float16 rounding differs with the padded shape): one padded batch and every text alone agree."""
    ckpt = checkpoint_factory("tiny", outliers=True)
    _, together, _, err = json_run([ckpt], tmp_path, capsys, "a.json")
    monkeypatch.setattr(diff_torch, "BATCH_BYTES", 1)                   # every text alone, as at a 256k vocabulary
    _, alone, _, err_alone = json_run([ckpt], tmp_path, capsys, "b.json")
    assert "in 1 batch(es)" in err and f"in {len(EVAL_TEXTS)} batch(es)" in err_alone
    for m in (together, alone):
        assert m["top1_agreement"] == 1.0 and m["kl_max"] < 1e-9 and m["max_abs_diff"] < 1e-3
    assert [row["tokens"] for row in alone["texts"]] == [row["tokens"] for row in together["texts"]]
    assert alone["delimiter_tokens"]["tokens"] == together["delimiter_tokens"]["tokens"] == 2 * len(EVAL_TEXTS)
    assert [l["max_abs_ref"] for l in alone["layers"]] == pytest.approx([l["max_abs_ref"] for l in together["layers"]])
    assert [l["max_abs"] for l in alone["layers"]] == pytest.approx([l["max_abs"] for l in together["layers"]])


def test_batches_stay_within_the_budget():
    lengths = [9, 14, 24, 20, 331, 319, 10]
    assert diff_torch.text_batches(lengths, row_bytes=1, budget=10**9) == [list(range(7))]
    assert diff_torch.text_batches(lengths, row_bytes=1, budget=100) == [[0, 1, 2, 3], [4], [5], [6]]
    for budget in (50, 700, 2000):
        for batch in diff_torch.text_batches(lengths, row_bytes=1, budget=budget):
            assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= budget


def test_cls_pooled_classifier_reports_its_cls_row(checkpoint_factory, tmp_path, capsys):
    ckpt = checkpoint_factory("tiny", "classify", outliers=True, config_overrides={"classifier_pooling": "cls"})
    code, m, out, _ = json_run([ckpt, "--precision", "float16"], tmp_path, capsys)
    assert code == 0 and m["token_output"] == "encoder output (final norm)" and m["token_measure"] == "cosine"
    assert {"cosine_min", "cosine_mean", "worst_text"} <= set(m["cls_row"]) and "[CLS] row" in out
    assert m["cls_row"]["cosine_min"] >= m["delimiter_tokens"]["cosine_min"]     # [CLS] rows are delimiter rows
    assert 1 <= m["worst_text"]["text"] <= len(EVAL_TEXTS) and m["worst_text"]["kl"] == m["kl_max"]
    assert_names_its_token(m["worst_token"])
    mean_pooled = checkpoint_factory("tiny", "classify", config_overrides={"classifier_pooling": "mean"})
    code, m, _, _ = json_run([mean_pooled], tmp_path, capsys)
    assert code == 0 and "cls_row" not in m and "worst_text" in m


def test_one_label_head_is_compared_by_its_score(checkpoint_factory, tmp_path, capsys):
    """A reranker / regression head: softmax over one label is always 1, so KL says nothing; the score's error."""
    ckpt = checkpoint_factory("tiny", "classify", labels=("LABEL_0",))
    code, m, out, _ = json_run([ckpt, "--precision", "float16", "--max-score-error", "1"], tmp_path, capsys)
    assert code == 0 and "kl_mean" not in m and "top1_agreement" not in m
    assert 0 < m["score_abs_error_max"] < 0.1 and m["score_abs_error_mean"] <= m["score_abs_error_max"]
    assert m["score_rel_error_max"] > 0 and m["worst_text"]["abs_error"] == m["score_abs_error_max"]
    assert m["gates"] == [{"flag": "--max-score-error", "metric": "score_abs_error_max", "limit": 1.0,
                           "value": m["score_abs_error_max"], "passed": True}]
    assert "PASS  score_abs_error_max" in out
    code, m, _, err = json_run([ckpt, "--precision", "float16", "--max-score-error", "1e-9"], tmp_path, capsys)
    assert code == 1 and "exceeds --max-score-error" in err and m["gates"][0]["passed"] is False
    code, _, err = run_main([str(ckpt), "--max-kl", "0.1"], capsys)
    assert code == 2 and err.count("error:") == 1 and "--max-kl does not apply" in err and "--max-score-error" in err


def test_max_kl_gate(checkpoint_factory, tmp_path, capsys):
    code, m, _, err = json_run([checkpoint_factory(), "--max-kl", "1e-30", "--precision", "float16"], tmp_path, capsys)
    assert code == 1 and "exceeds --max-kl" in err and not m["gates"][0]["passed"]
    code, _, err = run_main([str(checkpoint_factory()), "--max-score-error", "0.1"], capsys)
    assert code == 2 and "--max-score-error does not apply" in err


def test_report_shows_the_texts_and_the_gate(checkpoint_factory, tmp_path, capsys):
    folder = tmp_path / "report"
    code, _, _ = run_main([str(checkpoint_factory("tiny", outliers=True)), "--precision", "float16", "--max-kl", "1",
                           "--rotation", "none", "--report", str(folder)], capsys)   # unrotated: the delimiters worst
    page = (folder / "index.html").read_text()
    assert code == 0 and '<p class="gate pass">PASS: kl_mean' in page
    assert page.count('<p class="tokens">') == len(EVAL_TEXTS) and "Delimiter and ordinary tokens" in page
    assert "one panel per text" in page and re.search(r"Worst token: <b>“\[(CLS|SEP)\]” \(text \d, position", page)


def test_norm_flag_measures_any_float16_strategy(checkpoint_factory, tmp_path, capsys):
    """--rotation with --norm runs any strategy convert.py can build: unrotated, the fused LayerNorm's squares
    overflow on planted outliers, the safe form's do not (and its output is closer to transformers)."""
    folder = checkpoint_factory("tiny", outliers=True)
    runs = {}
    for norm in ("fused", "safe"):
        code, m, out, _ = json_run([folder, "--precision", "float16", "--rotation", "none", "--norm", norm],
                                   tmp_path, capsys, f"{norm}.json")
        assert code == 0 and m["norm"] == norm and f"rotation none, norm {norm}" in out
        runs[norm] = m
    assert runs["fused"]["overflow_count"] > 0 and runs["fused"]["first_overflow"].endswith(".square")
    assert runs["safe"]["overflow_count"] == 0 and runs["safe"]["kl_mean"] < runs["fused"]["kl_mean"] / 10
