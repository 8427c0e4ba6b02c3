"""rotations/: fused rotations leave the function unchanged and make float16 safe."""
import copy
import json
import math

import pytest
import torch

from checkpoints import CONFIGS, MASSIVE, OUTLIER_CHANNELS, build_tokenizer
from modernbert_ane.evaluation import EVAL_TEXTS, tokenize
from modernbert_ane.model import ModernBert, ModernBertConfig, RMSNorm
from modernbert_ane.rotations import NoHadamardConstructionError, rotate_model
from modernbert_ane.rotations import strategy
from modernbert_ane.user_errors import run_cli
from modernbert_ane import diff_torch


def load(folder, task=None):
    return ModernBert.from_pretrained(str(folder), task=task)[0]


def run(model, ids, mask):
    with torch.no_grad():
        return model(ids, mask.to(next(model.parameters()).dtype))


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("kind", ["hadamard", "random", "identity"])
def test_rotation_preserves_the_function(checkpoint_factory, config, kind):
    model = load(checkpoint_factory(config, "fill-mask"))
    ids, mask = tokenize(build_tokenizer(), EVAL_TEXTS, 512)
    before = run(model, ids, mask)
    rotated = rotate_model(copy.deepcopy(model), kind, seed=3)
    after = run(rotated, ids, mask)
    assert (before - after)[mask.bool()].abs().max() <= 1e-4
    assert rotated.rotation["kind"] == kind and rotated.rotation["seed"] == 3
    if kind == "identity":                                       # norms folded, stream centred, nothing rotated
        assert torch.equal(torch.from_numpy(rotated.rotation["matrix"]), torch.eye(rotated.config.hidden_size,
                                                                                 dtype=torch.float64))
    assert not any(isinstance(b.mlp_norm, torch.nn.LayerNorm) for b in rotated.layers)
    assert all(isinstance(b.mlp_norm, RMSNorm) for b in rotated.layers)


@pytest.mark.parametrize("task", ["encoder", "classify", "token-classify", "embed"])
def test_rotation_preserves_other_heads(checkpoint_factory, task):
    model = load(checkpoint_factory("biased", "encoder" if task == "embed" else task), task)
    ids, mask = tokenize(build_tokenizer(), EVAL_TEXTS, 512)
    before = run(model, ids, mask)
    after = run(rotate_model(copy.deepcopy(model), "hadamard"), ids, mask)
    diff = (before - after).abs() if task in ("classify", "embed") else (before - after)[mask.bool()].abs()
    assert diff.max() <= 1e-4


def test_rotation_is_deterministic_per_seed(checkpoint_factory):
    model = load(checkpoint_factory("tiny", "fill-mask"))
    a = rotate_model(copy.deepcopy(model), "hadamard", seed=1).state_dict()
    b = rotate_model(copy.deepcopy(model), "hadamard", seed=1).state_dict()
    c = rotate_model(copy.deepcopy(model), "hadamard", seed=2).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layers.1.mlp.Wi.weight"], c["layers.1.mlp.Wi.weight"])


def test_size_without_hadamard_names_the_fallback():
    config = ModernBertConfig(vocab_size=64, hidden_size=92, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, layer_types=("full_attention", "sliding_attention"),
                              max_position_embeddings=64)
    model = ModernBert(config).eval()
    with pytest.raises(NoHadamardConstructionError, match="--rotation random"):
        rotate_model(copy.deepcopy(model), "hadamard")
    ids, mask = torch.randint(5, 64, (1, 20)), torch.ones(1, 20)
    assert (run(model, ids, mask) - run(rotate_model(model, "random"), ids, mask)).abs().max() <= 1e-4


def test_rms_norm_survives_float16_with_massive_inputs():
    x = torch.randn(1, 64, 1, 8, dtype=torch.float64)
    x[:, 5, :, :3] = 3e4
    x[:, 17, :, :3] = -2.9e4
    reference = x / (x.pow(2).mean(1, keepdim=True) + 1e-5).sqrt()
    norm = RMSNorm(1e-5)
    out = norm(x.half())
    assert torch.isfinite(out).all()
    assert (out.double() - reference).abs().max() < 2e-2
    assert (x.half() * x.half()).isinf().any()                       # the plain square would have overflowed


def diff_json(folder, tmp_path, rotation, precision="float16"):
    path = tmp_path / f"{rotation}-{precision}.json"
    with pytest.raises(SystemExit) as e:
        run_cli(diff_torch.main, [str(folder), "--precision", precision, "--rotation", rotation, "--json", str(path)])
    assert e.value.code == 0
    return json.loads(path.read_text())


def test_planted_outliers_overflow_float16_unless_rotated(checkpoint_factory, tmp_path):
    folder = checkpoint_factory("tiny", "fill-mask", outliers=True)
    plain = diff_json(folder, tmp_path, "none")
    rotated = diff_json(folder, tmp_path, "hadamard")
    # the planted checkpoint really carries massive activations, on the delimiter tokens
    ref_peaks = [row["max_abs_ref"] for row in rotated["layers"]]
    assert min(ref_peaks) > 0.9 * MASSIVE
    # unrotated float16: the first norm after the embeddings squares ~3e4 and overflows
    assert plain["overflow_count"] > 0 and "norm" in plain["first_overflow"]
    assert plain["top1_agreement"] < 0.99
    # rotated float16: nothing anywhere (inside norms included) leaves the float16 range
    assert rotated["nonfinite"] == 0 and rotated["overflow_count"] == 0 and rotated["first_overflow"] is None
    assert rotated["top1_agreement"] >= 0.99
    # the largest activation per layer shrinks by about sqrt(hidden) / (number of massive channels)
    expected = math.sqrt(CONFIGS["tiny"]["hidden_size"]) / len(OUTLIER_CHANNELS)
    for row in rotated["layers"]:
        assert 0.6 * expected <= row["max_abs_ref"] / row["max_abs"] <= 1.4 * expected, row


def test_strategy_choice_ranks_overflowing_candidates_last():
    rows = [{"rotation": "none", "norm": "l2eps", "kl_mean": 1e-9, "overflow_count": 90, "nonfinite": 0},
            {"rotation": "hadamard", "norm": "safe", "kl_mean": 3e-7, "overflow_count": 0, "nonfinite": 0},
            {"rotation": "none", "norm": "safe", "kl_mean": 4e-8, "overflow_count": 0, "nonfinite": 0},
            {"rotation": "identity", "norm": "safe", "kl_mean": 4e-8, "overflow_count": 0, "nonfinite": 0}]
    assert strategy.choose(rows, "fill-mask") is rows[2]                 # a tie: the first listed
    cosine = [{**r, "cosine_min": c} for r, c in zip(rows, (1.0, 0.98, 0.9999, 0.9998))]
    assert strategy.choose(cosine, "encoder") is cosine[2]
    table = strategy.format_strategies(rows, "fill-mask", rows[2])
    assert "| none | safe | 4e-08 | 0 | 0 | yes |" in table and table.count("yes") == 1


@pytest.mark.parametrize("plant", ["embedding", "mlp"])
def test_without_rotation_a_safe_norm_beats_hadamard_on_delimiters(checkpoint_factory, plant):
    """The rotation spreads a delimiter's 3e4 over every channel, where float16's spacing rounds the token's
    small components away; a safe norm without rotation keeps them (model.py in float16, against transformers)."""
    folder = checkpoint_factory("small", "encoder", outliers=plant)
    model = load(folder)
    ids, mask = tokenize(build_tokenizer(), EVAL_TEXTS, 128)
    from modernbert_ane.evaluation import reference_model, reference_outputs
    from modernbert_ane.checkpoint import resolve_checkpoint
    ckpt = resolve_checkpoint(str(folder))
    reference = reference_outputs(reference_model(ckpt, "encoder"), "encoder", ids, mask, ckpt)["output"]
    rows = {(r, n): strategy.measure(model, r, n, 0, reference, ids, mask)
            for r, n in (("none", "safe"), ("hadamard", "safe"), ("none", "fused"))}
    assert rows[("none", "fused")]["overflow_count"] > 0                 # the fused LayerNorm squares 3e4
    assert rows[("none", "safe")]["overflow_count"] == rows[("hadamard", "safe")]["overflow_count"] == 0
    assert rows[("none", "safe")]["cosine_min"] >= 0.999
    assert rows[("none", "safe")]["cosine_min"] > rows[("hadamard", "safe")]["cosine_min"]
    assert strategy.choose(list(rows.values()), "encoder") is rows[("none", "safe")]


def test_auto_under_int8_records_candidates_measured_with_int8_weights(checkpoint_factory, tmp_path):
    """`convert.py --compress int8` (default --rotation auto) records each candidate's numbers as measured with
    the int8-rounded weights (convert.simulate_compression), not the float16 ones: the rotated and unrotated
    weights quantize differently, so the choice must see them."""
    import functools
    from modernbert_ane import convert
    from modernbert_ane.checkpoint import resolve_checkpoint
    from modernbert_ane.evaluation import reference_model, reference_outputs
    from modernbert_ane.coreml.package import read_metadata
    folder, package = checkpoint_factory("tiny", outliers=True), tmp_path / "int8.mlpackage"
    with pytest.raises(SystemExit) as e:
        run_cli(convert.main, [str(folder), "--seq-len", "32", "--compress", "int8", "--skip-check", "-o", str(package)])
    assert e.value.code == 0
    meta = read_metadata(package)
    assert meta["strategy"]["compress"] == "int8" and meta["compress"] == "int8"
    model, ckpt = load(folder), resolve_checkpoint(str(folder))
    ids, mask = tokenize(build_tokenizer(), EVAL_TEXTS, 32)
    reference = reference_outputs(reference_model(ckpt, "fill-mask"), "fill-mask", ids, mask, ckpt)["output"]
    compress = functools.partial(convert.simulate_compression, mode="int8",
                                 embedding_gain=float(model.embeddings.norm.weight.detach().abs().max()))
    for row in meta["strategy"]["candidates"]:
        int8 = strategy.measure(model, row["rotation"], row["norm"], 0, reference, ids, mask, compress)
        plain = strategy.measure(model, row["rotation"], row["norm"], 0, reference, ids, mask)
        assert row["kl_mean"] == strategy.rounded(int8["kl_mean"]) > 10 * plain["kl_mean"], (row, plain["kl_mean"])
    chosen = strategy.choose(meta["strategy"]["candidates"], "fill-mask")
    assert (meta["rotation"], meta["norm"]) == (chosen["rotation"], chosen["norm"])
