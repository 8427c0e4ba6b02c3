"""convert.py: packages that compute what transformers computes, checked on the float16 emulator."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import convert
from checkpoints import CONFIGS, build_tokenizer
from evaluation import EVAL_TEXTS, distribution_metrics, reference_model, tokenize
from checkpoint import resolve_checkpoint
from mlpackage import input_lengths, read_metadata
from mlprogram_emulator import MLProgramEmulator
from user_errors import run_cli

WINDOW = CONFIGS["tiny"]["local_attention"]          # 16: a token sees neighbours within 8
SHORT, LONG = 12, 48                                  # below the window, and 3x the window


def run_convert(argv, capsys=None):
    with pytest.raises(SystemExit) as e:
        run_cli(convert.main, [str(a) for a in argv])
    err = capsys.readouterr().err if capsys else ""
    return e.value.code, err


@pytest.fixture(scope="module")
def packages(checkpoint_factory, tmp_path_factory):
    """name -> (package, checkpoint folder), converted once for the module."""
    out = tmp_path_factory.mktemp("packages")
    made = {}

    def make(name, folder, *options):
        package = out / f"{name}.mlpackage"
        if name not in made:
            code, _ = run_convert([folder, "-o", package, *options])
            assert code == 0
            made[name] = (package, folder)
        return made[name]
    return make


def emulate(package, ids, mask, pessimistic=False):
    out = MLProgramEmulator(str(package), pessimistic=pessimistic).predict({"input_ids": ids.numpy().astype(np.int32),
                                                   "attention_mask": mask.numpy().astype(np.int32)})
    return next(iter(out.values()))


def transformers_logits(folder, ids, mask):
    with torch.no_grad():
        return reference_model(resolve_checkpoint(str(folder)), "fill-mask")(
            input_ids=ids.long(), attention_mask=mask).logits.numpy()


def test_enumerated_lengths_below_and_above_the_window(packages, checkpoint_factory):
    package, folder = packages("tiny-enum", checkpoint_factory("tiny"), "--seq-len", SHORT, LONG)
    assert input_lengths(package) == [SHORT, LONG]
    meta = read_metadata(package)
    assert meta["task"] == "fill-mask" and meta["seq_lengths"] == [SHORT, LONG] and meta["rotation"] == "hadamard"
    assert meta["mask_token_id"] == build_tokenizer().mask_token_id and meta["version"]
    tokenizer = build_tokenizer()
    for length, text in ((SHORT, EVAL_TEXTS[0]), (LONG, EVAL_TEXTS[6])):
        ids, mask = tokenize(tokenizer, [text], length, pad_to=length)
        ours, ref = emulate(package, ids, mask), transformers_logits(folder, ids, mask)
        valid = mask.numpy().astype(bool)
        m = distribution_metrics(ref[valid], ours[valid])
        assert np.isfinite(ours).all() and m["top1_agreement"] >= 0.99 and m["kl_max"] < 1e-2, (length, m)


def test_sliding_window_and_padding_survive_conversion(packages, checkpoint_factory):
    """A conversion that optimized the local window away (as a trace at one token once did) or ignored
    padding would pass a short-text check: compare against a window-less model and against re-padding."""
    package, folder = packages("tiny-enum", checkpoint_factory("tiny"), "--seq-len", SHORT, LONG)
    tokenizer = build_tokenizer()
    ids, mask = tokenize(tokenizer, [EVAL_TEXTS[6]], LONG, pad_to=LONG)          # all 48 tokens real
    ours = emulate(package, ids, mask)[0]
    ref = transformers_logits(folder, ids, mask)[0]
    from model import ModernBert
    unwindowed, _ = ModernBert.from_pretrained(str(folder))
    unwindowed.config.local_attention = 10 ** 6
    with torch.no_grad():
        no_window = unwindowed(ids, mask).numpy()[0]
    assert np.abs(ours - ref).max() < 0.1
    assert np.abs(no_window - ref).max() > 10 * np.abs(ours - ref).max()     # the window changes the answer
    short_ids, short_mask = tokenize(tokenizer, [EVAL_TEXTS[3]], LONG, pad_to=LONG)
    n = int(short_mask.sum())
    padded = emulate(package, short_ids, short_mask)[0, :n]
    exact_ids, exact_mask = tokenize(tokenizer, [EVAL_TEXTS[3]], SHORT + 100)
    assert exact_ids.shape[1] == n
    reference = transformers_logits(folder, exact_ids, exact_mask)[0]
    assert np.abs(padded - reference).max() < 0.1                           # padding is masked out


def planted_outlier_top1(package, folder):
    """Pessimistic emulation: the fused layer_norm op also squares in float16, as hardware may."""
    tokenizer = build_tokenizer()
    ids, mask = tokenize(tokenizer, [EVAL_TEXTS[7]], LONG, pad_to=LONG)
    ours, ref = emulate(package, ids, mask, pessimistic=True), transformers_logits(folder, ids, mask)
    valid = mask.numpy().astype(bool)
    return distribution_metrics(ref[valid], ours[valid])["top1_agreement"], int((~np.isfinite(ours)).sum())


def test_planted_outliers_need_the_rotation(packages, checkpoint_factory):
    folder = checkpoint_factory("tiny", outliers=True)
    rotated, _ = packages("outliers-hadamard", folder, "--seq-len", LONG)
    plain, _ = packages("outliers-none", folder, "--seq-len", LONG, "--rotation", "none", "--skip-check")
    top1, nonfinite = planted_outlier_top1(rotated, folder)
    assert top1 >= 0.99 and nonfinite == 0
    top1_plain, nonfinite_plain = planted_outlier_top1(plain, folder)
    assert top1_plain < 0.99 or nonfinite_plain > 0


@pytest.mark.parametrize("config", ["biased", "odd"])
def test_other_configs_convert(packages, checkpoint_factory, config):
    package, folder = packages(f"{config}", checkpoint_factory(config), "--seq-len", LONG)
    ids, mask = tokenize(build_tokenizer(), [EVAL_TEXTS[8]], LONG, pad_to=LONG)
    ours, ref = emulate(package, ids, mask), transformers_logits(folder, ids, mask)
    assert distribution_metrics(ref[0], ours[0])["top1_agreement"] >= 0.99


def test_same_options_give_the_same_bytes(checkpoint_factory, tmp_path):
    folder = checkpoint_factory("tiny")
    a, b = tmp_path / "a.mlpackage", tmp_path / "b.mlpackage"
    for out in (a, b):
        assert run_convert([folder, "--seq-len", SHORT, "-o", out, "--skip-check"])[0] == 0
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_default_output_name_is_deterministic():
    assert convert.default_output_name("answerdotai/ModernBERT-base", "fill-mask", "hadamard", 0, [128, 512]) == \
        "ModernBERT-base-fill-mask-hadamard-128-512.mlpackage"
    assert convert.default_output_name("/x/my ckpt/", "classify", "random", 3, [64]) == \
        "my-ckpt-classify-random-seed3-64.mlpackage"


def test_existing_output_is_kept_without_force(checkpoint_factory, tmp_path, capsys):
    out = tmp_path / "kept.mlpackage"
    out.mkdir()
    (out / "marker").write_text("mine")
    code, err = run_convert([checkpoint_factory("tiny"), "--seq-len", SHORT, "-o", out], capsys)
    assert code == 2 and "--force" in err and (out / "marker").read_text() == "mine"
    code, _ = run_convert([checkpoint_factory("tiny"), "--seq-len", SHORT, "-o", out, "--force", "--skip-check"])
    assert code == 0 and not (out / "marker").exists() and (out / "Manifest.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["kept.mlpackage"]            # no temporary left behind


def test_failed_check_leaves_nothing(checkpoint_factory, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(convert, "CHECK_MIN_TOP1", 1.01)                       # no package can pass
    out = tmp_path / "never.mlpackage"
    code, err = run_convert([checkpoint_factory("tiny"), "--seq-len", SHORT, "-o", out], capsys)
    assert code == 2 and "correctness check failed" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv,message", [
    (["--seq-len", "16", "32", "--deployment-target", "iOS17"], "need --deployment-target macOS15 or iOS18"),
    (["--seq-len", "4096"], "exceeds the model's 1024 positions"),
    (["--seq-len", "16", "--max-texts", "9"], "--max-texts must be between 1 and 8"),
    (["-o", "x.mlmodel"], "must end in .mlpackage"),
    (["-o", "/no/such/dir/x.mlpackage"], "does not exist"),
])
def test_bad_options_get_one_line(checkpoint_factory, tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    code, err = run_convert([checkpoint_factory("tiny"), *argv], capsys)
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert list(Path(tmp_path).iterdir()) == []


def test_output_inside_the_checkpoint_is_refused(checkpoint_factory, capsys):
    folder = checkpoint_factory("tiny")
    code, err = run_convert([folder, "-o", folder / "x.mlpackage"], capsys)
    assert code == 2 and "inside the checkpoint folder" in err and not (folder / "x.mlpackage").exists()


def square_tensor_ops(package, length):
    """How many ops of the package produce a tensor with two axes of the sequence length."""
    count = [0]

    def observe(name, op_type, value):
        count[0] += sum(1 for d in np.shape(value) if d == length) >= 2
    MLProgramEmulator(str(package)).predict({"input_ids": np.full((1, length), 7, np.int32),
                                             "attention_mask": np.ones((1, length), np.int32)}, observe=observe)
    return count[0]


def test_blockwise_local_layers_have_no_square_tensor(packages, checkpoint_factory):
    """At 10x the window radius: the blockwise package matches transformers (with padding), and its only
    S x S tensors are the global layers' (tiny: 2 global of 4 layers)."""
    folder = checkpoint_factory("tiny")
    length = 80                                                 # hidden 64, 3C 192: no axis is 80 by chance
    blockwise, _ = packages("tiny-blockwise", folder, "--seq-len", length, "--local-attention", "blockwise")
    masked, _ = packages("tiny-masked", folder, "--seq-len", length, "--local-attention", "masked", "--skip-check")
    assert read_metadata(blockwise)["local_attention"] == "blockwise"
    ids, mask = tokenize(build_tokenizer(), [EVAL_TEXTS[6]], 70, pad_to=70)
    ids = torch.nn.functional.pad(ids, (0, length - 70), value=build_tokenizer().pad_token_id)
    mask = torch.nn.functional.pad(mask, (0, length - 70))
    ours, ref = emulate(blockwise, ids, mask), transformers_logits(folder, ids, mask)
    valid = mask.numpy().astype(bool)
    assert distribution_metrics(ref[valid], ours[valid])["top1_agreement"] >= 0.99
    layer_types = json.loads((folder / "config.json").read_text())["layer_types"]
    share = layer_types.count("full_attention") / len(layer_types)
    assert square_tensor_ops(blockwise, length) <= share * square_tensor_ops(masked, length)


def weights_bytes(package):
    return sum(p.stat().st_size for p in (Path(package) / "Data").rglob("*") if p.is_file() and "weights" in p.parts)


@pytest.mark.parametrize("outliers", [False, True], ids=["plain", "planted-outliers"])
def test_int8_compression(packages, checkpoint_factory, outliers):
    folder = checkpoint_factory("tiny", outliers=outliers)
    fp16, _ = packages(f"fp16-{outliers}", folder, "--seq-len", LONG, "--skip-check")
    int8, _ = packages(f"int8-{outliers}", folder, "--seq-len", LONG, "--compress", "int8")
    ratio = weights_bytes(int8) / weights_bytes(fp16)
    assert ratio < (0.75 if outliers else 0.6), ratio            # outliers: token embeddings stay float16
    assert read_metadata(int8)["compress"] == "int8"
    ids, mask = tokenize(build_tokenizer(), [EVAL_TEXTS[7]], LONG, pad_to=LONG)
    ours, ref = emulate(int8, ids, mask), transformers_logits(folder, ids, mask)
    assert distribution_metrics(ref[0], ours[0])["top1_agreement"] >= 0.98
