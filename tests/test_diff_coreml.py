"""diff_coreml.py: a converted package against transformers, with the emulator."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from modernbert_ane import convert
from modernbert_ane import diff_coreml
from checkpoints import CONFIGS, build_sentence_transformers, build_tokenizer
from modernbert_ane.evaluation import EVAL_TEXTS
from modernbert_ane.coreml.package import Package
from modernbert_ane.coreml.runner import PackageRunner
from modernbert_ane.user_errors import run_cli

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
        run_cli(convert.main, [str(checkpoint_factory("tiny")), "--seq-len", "32", "128", "-o", str(out),
                               "--rotation", "hadamard"])          # rotated: the report and op-grouping tests need it
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
    # per token: delimiters apart from ordinary tokens, the worst one named (text, position, token), per text too
    delimiters, ordinary, worst = m["delimiter_tokens"], m["ordinary_tokens"], m["worst_token"]
    assert delimiters["tokens"] == 2 * len(m["texts"]) and m["token_measure"] == "kl"
    assert delimiters["tokens"] + ordinary["tokens"] == sum(row["tokens"] for row in m["texts"])
    assert worst["kl"] == m["kl_max"] == max(delimiters["kl_max"], ordinary["kl_max"])
    ids = build_tokenizer()(EVAL_TEXTS[worst["text"] - 1])["input_ids"]
    assert ids[worst["position"]] == worst["token_id"] and worst["token"] == build_tokenizer().convert_ids_to_tokens(
        worst["token_id"])
    assert m["texts"][worst["text"] - 1]["worst_token"]["position"] == worst["position"]
    assert "worst token      text" in out and m["gates"] == []


def test_report_plots_the_package_per_layer(package, tmp_path, capsys):
    folder = tmp_path / "report"
    code, out, _ = run(diff_coreml.main, [package, "--backend", "emulate", "--report", folder], capsys)
    page = (folder / "index.html").read_text()
    assert code == 0 and page.count('<img src="data:image/png;base64,') == 2
    assert "before rotation: model.py unrotated, float32" in page
    assert "after rotation (hadamard): this package, float16 emulator" in page
    assert page.count('<p class="tokens">') == 9 and "one panel per text" in page and "Worst token: <b>“" in page


def test_placement_records_from_a_mac_reach_the_json_and_the_report(package, tmp_path, capsys):
    """--placement: compute-plan records saved on a Mac (here: the package's own ops, softmax placed on the CPU),
    their FLOPs counted from the package at its largest length; or bench_device.py's --json; or a one-line error."""
    from modernbert_ane.coreml.cost import Program, op_costs
    costs = op_costs(Program(package), 128)
    records = [{"name": c.name, "op_type": c.op_type, "device": "cpu" if c.op_type == "softmax" else "neural_engine"}
               for c in costs]
    (tmp_path / "plan.json").write_text(json.dumps({"compute_units": "all", "records": records}))
    code, out, _ = run(diff_coreml.main, [package, "--backend", "emulate", "--placement", tmp_path / "plan.json",
                                          "--json", tmp_path / "m.json", "--report", tmp_path / "r"], capsys)
    assert code == 0
    placed = json.loads((tmp_path / "m.json").read_text())["placement"]["all"]
    softmax = [c for c in costs if c.op_type == "softmax"]
    total = sum(c.flops for c in costs)
    assert placed["fallbacks"]["softmax"]["count"] == len(softmax) == placed["ops_by_device"]["cpu"] > 0
    assert placed["neural_engine_flop_share"] == pytest.approx(1 - sum(c.flops for c in softmax) / total)
    assert f"all: {len(costs)} ops (cpu {len(softmax)}, neural_engine {len(costs) - len(softmax)})" in out
    page = (tmp_path / "r" / "index.html").read_text()
    assert "Where Core ML runs the ops" in page and "compute units all:" in page and "(compute-plan records)" in page
    (tmp_path / "bench.json").write_text(json.dumps({"placement": {"cpu-and-ne": placed}}))     # bench_device's
    assert diff_coreml.read_placement(str(tmp_path / "bench.json")) == {"summaries": {"cpu-and-ne": placed}}
    (tmp_path / "bad.json").write_text(json.dumps({"records": [{"op": 1}]}))
    code, out, err = run(diff_coreml.main, [package, "--placement", tmp_path / "bad.json"], capsys)
    assert code == 2 and err.count("error:") == 1 and "neither bench_device.py's --json" in err and not out


def program_ops(layer_convs=("attn_Wqkv", "attn_Wo", "mlp_Wi", "mlp_Wo"), rotated=True):
    """(op kind, peak, conv weight name or None) in run order, shaped like a converted 2-layer package."""
    ops = [("gather", 1, None), ("layer_norm", 30001, None)]
    ops += [("conv", 9, "model_embeddings_proj_weight_to_fp16")] if rotated else []
    ops += [("greater", 1, None)]
    for layer in range(2):
        convs = iter(layer_convs)
        for kind, peak in [("rsqrt", 2), ("conv", 3), ("softmax", 1), ("conv", 4), ("add", 5), ("conv", 6),
                           ("gelu", 7), ("conv", 8), ("add", 10 + layer)]:
            weight = f"model_layers_{layer}_{next(convs)}_weight_to_fp16_quantized" if kind == "conv" else None
            ops.append((kind, peak, weight))
    return ops + [("layer_norm", 40, None), ("conv", 50, "model_decoder_weight_to_fp16"), ("add", 1, None)]


def grouped_peaks(ops):
    watch = diff_coreml.OverflowWatch({f"op_{i}": weight for i, (_, _, weight) in enumerate(ops) if weight})
    for i, (kind, peak, _) in enumerate(ops):
        watch.observe(f"op_{i}", kind, np.array([peak], dtype=np.float32))
    return watch.layer_peaks()


def test_package_ops_are_grouped_per_layer():
    """Convs go where their weight's name says; other ops with the next conv, a residual add with the conv
    before it; everything before layer 0 is the embeddings', everything after the last conv the head's."""
    expected = {"embeddings": 30001, "layers.0": 10, "layers.1": 11, "head": 50}
    assert grouped_peaks(program_ops()) == expected
    assert grouped_peaks(program_ops(rotated=False)) == expected
    # a layer written with another number of convs (separate q, k, v) is still grouped by name
    split_qkv = program_ops(layer_convs=("attn_Wq", "attn_Wo", "mlp_Wi", "mlp_Wo"))
    at = split_qkv.index(("conv", 3, "model_layers_0_attn_Wq_weight_to_fp16_quantized"))
    split_qkv[at + 1:at + 1] = [("conv", 3, "model_layers_0_attn_Wk_weight_to_fp16"),
                                ("conv", 3, "model_layers_0_attn_Wv_weight_to_fp16")]
    assert grouped_peaks(split_qkv) == expected


def test_package_ops_are_grouped_per_layer_in_a_real_package(package):
    """Every layer of the converted package gets its ops (the weights' names are the converter's)."""
    runner = PackageRunner(package, "emulate")
    conv_weights = diff_coreml.conv_weight_names(runner)
    watch = diff_coreml.OverflowWatch(conv_weights)
    ids = np.full((1, Package(package).lengths()[0]), 5, dtype=np.int32)
    runner.predict({"input_ids": ids, "attention_mask": np.ones_like(ids)}, observe=watch.observe)
    n_layers = CONFIGS["tiny"]["num_hidden_layers"]
    assert list(watch.layer_peaks()) == ["embeddings", *(f"layers.{i}" for i in range(n_layers)), "head"]
    assert len(conv_weights) == 1 + 4 * n_layers + 3      # embeddings proj, 4 per layer, final proj, head, decoder


def test_max_kl_fails_above_threshold(package, capsys):
    code, out, err = run(diff_coreml.main, [package, "--max-kl", "1e-12"], capsys)
    assert code == 1 and "exceeds --max-kl" in err and "FAIL  kl_mean" in out
    code, _, err = run(diff_coreml.main, [package, "--max-score-error", "0.1"], capsys)     # before any work
    assert code == 2 and "--max-score-error does not apply" in err and "running" not in err


def test_one_label_package_is_compared_by_its_score(checkpoint_factory, tmp_path, capsys):
    """A reranker / regression head: the score's absolute and relative error, gated by --max-score-error."""
    out = tmp_path / "score.mlpackage"
    ckpt = checkpoint_factory("tiny", "classify", labels=("LABEL_0",))
    assert run(convert.main, [ckpt, "--seq-len", "128", "-o", out], capsys)[0] == 0
    path = tmp_path / "s.json"
    code, printed, _ = run(diff_coreml.main, [out, "--json", path, "--max-score-error", "0.5"], capsys)
    m = json.loads(path.read_text())
    assert code == 0 and "kl_mean" not in m and 0 < m["score_abs_error_max"] < 0.5
    assert m["score_rel_error_max"] > 0 and m["worst_text"]["abs_error"] == m["score_abs_error_max"]
    assert len(m["texts"]) == len(EVAL_TEXTS) and "score_abs_error_max" in printed
    code, _, err = run(diff_coreml.main, [out, "--max-score-error", "1e-9"], capsys)
    assert code == 1 and "exceeds --max-score-error" in err
    code, _, err = run(diff_coreml.main, [out, "--max-kl", "1"], capsys)
    assert code == 2 and err.count("error:") == 1 and "one-label score" in err


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
