"""The bundled trained reference (tests/data/reference, bench/train_reference.py) through the whole pipeline.

Trained weights give sharp distributions, so top-1 agreement here means something (the random test
checkpoints need an identity-like head for that); the released byte-level BPE tokenizer exercises what the
WordPiece test tokenizer cannot (leading-space pieces, [MASK] with lstrip). Outliers are planted on the
trained weights too, by both mechanisms, since a short CPU pre-training does not grow them.
"""
import json
import shlex
import sys
from pathlib import Path

import pytest

from modernbert_ane import convert
from modernbert_ane import diff_coreml
from modernbert_ane import predict
from checkpoints import REFERENCE, REFERENCE_HEADS, build_reference
from modernbert_ane.checkpoint import load_tokenizer
from modernbert_ane.evaluation import tokenize
from modernbert_ane.user_errors import run_cli

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


def run(main, argv, capsys):
    capsys.readouterr()                                   # drop what came before (a conversion's report)
    with pytest.raises(SystemExit) as e:
        run_cli(main, [str(a) for a in argv])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    """packages(task, outliers=None, seq_len=(128, 256), *options) -> (checkpoint folder, package converted with
    the defaults at those lengths, but for `options`), built once."""
    built = {}

    def make(task="fill-mask", outliers=None, seq_len=(128, 256), *options):
        key = (task, outliers, seq_len, options)
        if key not in built:
            folder = tmp_path_factory.mktemp("reference")
            if task == "fill-mask" and outliers is None:
                ckpt = REFERENCE                                  # the bundled folder itself, read only
            else:
                ckpt = folder / "ckpt"
                build_reference(ckpt, task, outliers)
            package = folder / f"{task}.mlpackage"
            with pytest.raises(SystemExit) as e:
                run_cli(convert.main, [str(ckpt), "--task", task, "--seq-len", *map(str, seq_len), "--skip-check",
                                       *options, "-o", str(package)])      # diff_coreml checks it below
            assert e.value.code == 0
            built[key] = ckpt, package
        return built[key]

    return make


def metrics(package, tmp_path, capsys, *extra) -> dict:
    path = tmp_path / "m.json"
    code, _, err = run(diff_coreml.main, [package, "--backend", "emulate", "--pessimistic", "--json", path,
                                          "--force", *extra], capsys)
    assert code == 0, err
    return json.loads(path.read_text())


def test_reference_predicts_masked_code_far_better_than_word_frequencies():
    """Held-out standard-library text: top-1 at least twice a unigram guess fitted on the held-out text itself."""
    import torch
    from train_reference import chunk, corpus_files, load_tokenizer as reference_tokenizer, masked_accuracy, \
        token_stream, unigram_baseline
    import transformers
    tokenizer = reference_tokenizer()
    special = torch.tensor(tokenizer.all_special_ids)
    stream, _ = token_stream(tokenizer, corpus_files(), held_out=True)
    held = chunk(stream, 256, tokenizer.cls_token_id, tokenizer.sep_token_id)[:48]
    model = transformers.ModernBertForMaskedLM.from_pretrained(str(REFERENCE), dtype=torch.float32).eval()
    ours = masked_accuracy(model, held, tokenizer, special, seed=0)
    unigram = unigram_baseline(stream, held, tokenizer, special, seed=0)      # frequencies of the held-out text
    assert ours["tokens"] > 1000
    assert ours["top1"] > 2 * unigram["top1"] and ours["top5"] > 1.5 * unigram["top5"]


def test_recorded_quality_of_the_bundled_models():
    """What the training scripts measured, as committed: the README quotes these files."""
    training = json.loads((REFERENCE / "training.json").read_text())["quality"]
    assert training["held_out"]["top1"] > 3 * training["unigram"]["top1"]
    heads = json.loads((REFERENCE_HEADS / "heads.json").read_text())
    for task in ("classify", "token-classify"):
        assert heads[task]["held_out_accuracy"] > heads[task]["majority_baseline"] + 0.3


def test_byte_level_bpe_tokenization():
    """Leading-space pieces, and [MASK] that swallows the space before it (lstrip), as the released tokenizer does."""
    tokenizer = load_tokenizer(REFERENCE, tasks=("fill-mask",))
    ids, mask = tokenize(tokenizer, ["The capital of France is [MASK].", "for i in [MASK](n):"], 32)
    first = tokenizer.convert_ids_to_tokens(ids[0][mask[0] == 1])
    assert first == ["[CLS]", "The", "Ġcapital", "Ġof", "ĠFrance", "Ġis", "[MASK]", ".", "[SEP]"]
    second = tokenizer.convert_ids_to_tokens(ids[1][mask[1] == 1])
    assert second[:5] == ["[CLS]", "for", "Ġi", "Ġin", "[MASK]"] and "Ġ" not in second
    assert int(ids[0][0]) == 50281 and tokenizer.mask_token_id == 50284 and tokenizer.pad_token_id == 50283


@pytest.mark.parametrize("outliers", [None, "embedding", "mlp"])
def test_fill_mask_package_agrees_with_transformers(packages, outliers, tmp_path, capsys):
    """The defaults (--rotation auto: all four candidates) on the trained weights: the planted checkpoints at 128
    tokens (as the README's float16 tables measure them), the plain one at two enumerated lengths."""
    _, package = packages(*(("fill-mask", None) if outliers is None else ("fill-mask", outliers, (128,))))
    m = metrics(package, tmp_path, capsys)
    assert m["nonfinite"] == 0 and m["overflow_count"] == 0
    assert m["top1_agreement"] >= 0.99
    assert m["kl_mean"] <= 1e-4


@pytest.mark.parametrize("task", ["classify", "token-classify", "embed"])
def test_fine_tuned_heads_agree_with_transformers(packages, task, tmp_path, capsys):
    _, package = packages(task)
    m = metrics(package, tmp_path, capsys)
    assert m["nonfinite"] == 0
    if task == "embed":
        assert m["cosine_min"] >= 0.999
    else:
        assert m["top1_agreement"] == 1.0 and m["kl_mean"] <= 1e-4


def test_predict_fills_code_with_words_not_byte_pieces(packages, capsys):
    _, package = packages("fill-mask")                                             # the one converted above
    code, out, err = run(predict.main, [package, "for i in [MASK](len(items)):", "--top-k", "5", "--json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    tokens = [c["token"] for c in doc["results"][0]["masks"][0]["predictions"]]
    assert not any("Ġ" in t for t in tokens)
    assert " range" in tokens


def quick_start_commands() -> list[str]:
    """The README's quick-start lines that run the project's scripts."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [shlex.split(line, comments=True) for line in block.splitlines()
            if line.startswith(("python convert.py", "python predict.py"))]


def test_readme_quick_start_works_offline(tmp_path):
    """A new user without hub access: the bare `python convert.py` names the bundled model in one line, and the
    README's own commands convert it and fill a mask with a word of the corpus."""
    import os
    import subprocess
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    commands = quick_start_commands()
    assert [c[:2] for c in commands] == [["python", "convert.py"], ["python", "predict.py"], ["python", "convert.py"]]
    bare = subprocess.Popen([sys.executable, str(ROOT / "convert.py")], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)          # alongside the conversion below
    for command in commands[:2]:                      # run from a copy's point of view: paths as the README gives them
        argv = [sys.executable, str(ROOT / command[1])] + [
            str(ROOT / a) if a.startswith("tests/") else a for a in command[2:]]
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-2000:]
    _, stderr = bare.communicate(timeout=300)
    lines = stderr.strip().splitlines()
    assert bare.returncode == 2 and len(lines) == 1 and "offline" in lines[0]
    assert lines[0].endswith("tests/data/reference") and (ROOT / "tests" / "data" / "reference").is_dir()
    assert (tmp_path / "reference.mlpackage").is_dir()
    out = done.stdout.splitlines()
    first = out[next(i for i, line in enumerate(out) if "[MASK] at token" in line) + 1]
    assert first.split(None, 1)[1] == '" range"', done.stdout     # the most likely word
