"""rotations/online.py and `--mlp-rotation`: QuaRot's online Hadamard before every MLP's down projection."""
import copy
import json

import numpy as np
import pytest
import torch

from checkpoints import CONFIGS, build_checkpoint, build_tokenizer
from modernbert_ane import convert, diff_torch
from modernbert_ane.activation_quant import (CALIBRATION_TEXTS, activation_scale, calibrate, quantized_convs,
                                             simulated_activations)
from modernbert_ane.checkpoint import resolve_checkpoint
from modernbert_ane.coreml.package import Package
from modernbert_ane.evaluation import EVAL_TEXTS, kl_per_row, tokenize
from modernbert_ane.model import ModernBert, ModernBertConfig
from modernbert_ane.rotations import NoHadamardConstructionError, rotate_model
from modernbert_ane.rotations.fuse import float16_convs, kept_float16
from modernbert_ane.rotations.online import block_order, rotate_mlps
from modernbert_ane.user_errors import run_cli
from test_convert import run_convert

LENGTH = 48
PLANTED = "layers.1.mlp.Wo"            # tests/checkpoints.MLP_PLANT_LAYER's down projection


def load(folder) -> ModernBert:
    return ModernBert.from_checkpoint(resolve_checkpoint(str(folder)), "fill-mask").eval()


def test_block_orders_and_bad_sizes():
    """Base size: 1152 = 32 x Paley II 36 (dense), blocks of 128; the reference's 384 alike; sizes with no
    construction are refused in one line that names the alternative."""
    assert block_order("hadamard", 1152) == 1152 and block_order("block-hadamard", 1152) == 128
    assert block_order("hadamard", 384) == 384 and block_order("block-hadamard", 384) == 128
    assert block_order("block-hadamard", 2624) == 64 and block_order("block-hadamard", 96) == 96   # large; tiny
    with pytest.raises(NoHadamardConstructionError, match="use --mlp-rotation block-hadamard or none"):
        block_order("hadamard", 70)
    with pytest.raises(NoHadamardConstructionError, match="use --mlp-rotation none"):
        block_order("block-hadamard", 75)


@pytest.mark.parametrize("config", ["tiny", "grouped"])
def test_rotated_mlps_compute_the_same_function(checkpoint_factory, config):
    """float32 logits of the MLP-rotated model equal the unrotated model's to 1e-4, alone and under the residual
    Hadamard; "grouped" (I = 192: blocks of 96, a grouped conv of 2 groups) covers the block-diagonal form."""
    if config == "tiny":
        model = load(checkpoint_factory("tiny", outliers="mlp"))
    else:
        torch.manual_seed(0)
        model = ModernBert(ModernBertConfig(vocab_size=300, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                            num_attention_heads=4, layer_types=("full_attention",) * 2)).eval()
    ids = torch.randint(5, 300, (2, 40))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, 30:] = 0
    with torch.no_grad():
        ref = model(ids, mask)
    for kind in ("hadamard", "block-hadamard"):
        for residual in ("none", "hadamard"):
            rotated = rotate_model(rotate_mlps(copy.deepcopy(model), kind, seed=1), residual, seed=1)
            conv = rotated.layers[0].mlp.rotation
            assert conv.groups == model.config.intermediate_size // rotated.mlp_rotation["block"]
            if config == "grouped":
                assert conv.groups == (1 if kind == "hadamard" else 2)
            with torch.no_grad():
                out = rotated(ids, mask)
            assert float((out - ref).abs().max()) < 1e-4, (kind, residual)
    assert float16_convs(rotated) == (["embeddings.proj"] + [f"layers.{i}.mlp.rotation"
                                                             for i in range(len(rotated.layers))] + ["final_proj"])
    assert not any(kept_float16(name) for name in quantized_convs(rotated))
    assert not kept_float16("layers.1.mlp.Wo") and not kept_float16("xlayers.1.mlp.rotation")
    with pytest.raises(ValueError, match="before the residual"):
        rotate_mlps(rotate_model(copy.deepcopy(model), "hadamard"), "hadamard")


def w8a8_simulation(model: ModernBert, tokenizer) -> tuple[float, dict]:
    """(mean KL of model.py's W8A8 simulation against the unquantized model on the evaluation texts, the
    calibrated peaks): int8 weights per channel, int8 activations per tensor, as --compress w8a8 stores them."""
    ids, mask = tokenize(tokenizer, EVAL_TEXTS, LENGTH)
    with torch.no_grad():
        ref = model(ids, mask).numpy()
    quantized = copy.deepcopy(model)
    convert.simulate_compression(quantized, "int8", float("inf"))
    peaks = calibrate(quantized, *tokenize(tokenizer, CALIBRATION_TEXTS, LENGTH))
    with torch.no_grad(), simulated_activations(quantized, {k: activation_scale(v) for k, v in peaks.items()}):
        out = quantized(ids, mask).numpy()
    valid = mask.numpy() > 0
    return float(kl_per_row(ref[valid], out[valid]).mean()), peaks


def test_w8a8_spreads_the_planted_mlp_outlier(checkpoint_factory):
    """On the MLP plant the down projection's input peak (what sets W8A8's per-tensor scale) drops by about
    sqrt(I) = 9.8 with the dense Hadamard (measured 25,300 -> 2,580), and W8A8 is no worse for it. Not much
    better either: the scale is one per tensor, so the delimiter's spread value (~2.6e3) still sets a step far
    above the ordinary tokens' products (~1), which round to zero whatever the rotation (README: W8A8)."""
    tokenizer = build_tokenizer()
    plain = rotate_model(load(checkpoint_factory("tiny", outliers="mlp")), "hadamard")
    kl_plain, peaks_plain = w8a8_simulation(plain, tokenizer)
    rotated = rotate_model(rotate_mlps(load(checkpoint_factory("tiny", outliers="mlp")), "hadamard"), "hadamard")
    kl_rotated, peaks = w8a8_simulation(rotated, tokenizer)
    inner = plain.config.intermediate_size
    assert peaks_plain[PLANTED] > 1e4
    assert peaks_plain[PLANTED] / peaks[PLANTED] > 0.7 * np.sqrt(inner), (peaks_plain[PLANTED], peaks[PLANTED])
    assert kl_rotated < 1.1 * kl_plain, (kl_rotated, kl_plain)


def conv_inputs(package) -> dict[str, tuple[str, str]]:
    """Every conv of the package's main function: weight name -> (op making the weight, op making the input)."""
    function = Package(package).spec.mlProgram.functions["main"]
    ops = function.block_specializations[function.opset].operations
    producer = {out.name: op.type for op in ops for out in op.outputs}
    return {op.inputs["weight"].arguments[0].name: (producer.get(op.inputs["weight"].arguments[0].name),
                                                    producer.get(op.inputs["x"].arguments[0].name))
            for op in ops if op.type == "conv"}


def test_w8a8_package_keeps_the_online_rotation_float16(checkpoint_factory, tmp_path, capsys):
    """--compress w8a8 --mlp-rotation hadamard: the online conv reads the GeGLU product unquantized and holds
    float16 weights (one constant for every layer: Core ML stores identical constants once); every other
    encoder conv is int8 with a quantize/dequantize pair. The option is recorded in the metadata, the
    description and the default name; the package passes convert's check."""
    folder = checkpoint_factory("tiny", outliers="mlp")
    package = tmp_path / "w8a8.mlpackage"
    code, err = run_convert([folder, "-o", package, "--seq-len", LENGTH, "--compress", "w8a8", "--rotation",
                             "hadamard", "--mlp-rotation", "hadamard"], capsys)
    assert code == 0, err
    convs = conv_inputs(package)
    online = {w: v for w, v in convs.items() if "_mlp_rotation_" in w}
    assert list(online) == ["model_layers_0_mlp_rotation_weight_to_fp16"]
    assert online[next(iter(online))] == ("const", "mul")                    # float16 weights, the raw product
    quantized = {w: v for w, v in convs.items() if w.endswith("_quantized")}
    unquantized_input = [w for w, v in quantized.items() if v[1] != "dequantize"]
    assert len(quantized) == len(convs) - 3
    # the planted unit's product, even rotated (peak / median ~1e4), stays float16: activation_quant.crushed_inputs
    assert len(unquantized_input) == 1 and unquantized_input[0].startswith("model_layers_1_mlp_Wo_weight")
    meta = Package(package).metadata()
    assert meta["w8a8_float16_inputs"] == [PLANTED] and f"W8A8: {PLANTED}'s input kept float16" in err
    assert meta["mlp_rotation"] == {"kind": "hadamard", "block": 96, "seed": 0} and meta["rotation"] == "hadamard"
    assert "MLP rotation hadamard" in Package(package).spec.description.metadata.shortDescription
    assert "MLP rotation hadamard" in err
    assert convert.default_output_name(str(folder), ["fill-mask"], "hadamard", 0, [LENGTH], "w8a8",
                                       mlp_rotation="block-hadamard").endswith("-hadamard-mlp-block-hadamard-w8a8-48.mlpackage")
    assert convert.default_output_name(str(folder), ["fill-mask"], "hadamard", 0, [LENGTH], "w8a8") == \
        convert.default_output_name(str(folder), ["fill-mask"], "hadamard", 0, [LENGTH], "w8a8", mlp_rotation="none")


def test_bad_mlp_rotation_is_one_line(tmp_path, capsys, monkeypatch):
    """An intermediate size with no Hadamard construction (70): exit 2, one line on stderr, before any work,
    from convert.py and diff_torch.py alike."""
    monkeypatch.setitem(CONFIGS, "i70", dict(CONFIGS["tiny"], intermediate_size=70))
    folder = tmp_path / "i70"
    build_checkpoint(folder, "i70")
    capsys.readouterr()
    code, err = run_convert([folder, "--mlp-rotation", "hadamard", "-o", tmp_path / "x.mlpackage"], capsys)
    assert code == 2 and err.count("\n") == 1 and "no Hadamard matrix of order 70" in err, err
    assert not (tmp_path / "x.mlpackage").exists()
    with pytest.raises(SystemExit) as e:
        run_cli(diff_torch.main, [str(folder), "--mlp-rotation", "hadamard"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--mlp-rotation block-hadamard or none" in err, err


def test_diff_torch_mlp_rotation(checkpoint_factory, tmp_path, capsys):
    """diff_torch.py --mlp-rotation: float32 agrees with transformers as closely as without it; the JSON says so."""
    folder = checkpoint_factory("tiny")
    with pytest.raises(SystemExit) as e:
        run_cli(diff_torch.main, [str(folder), "--mlp-rotation", "block-hadamard", "--json", str(tmp_path / "m.json"),
                                  "--max-length", "64"])
    assert e.value.code == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["mlp_rotation"] == "block-hadamard" and metrics["kl_mean"] < 1e-8
