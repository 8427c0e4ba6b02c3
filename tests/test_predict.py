"""predict.py: every task's output against the float32 models, length choice, truncation, --json,
--pack against unpacked runs, and one-line errors for bad input.

Each package is converted once per module (convert.py in process, --skip-check); predictions run on
the float16 emulator."""
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from modernbert_ane import convert
from modernbert_ane import predict
from modernbert_ane.coreml.package import Package, package_inputs, read_metadata
from checkpoints import build_sentence_transformers
from modernbert_ane.user_errors import UserError, run_cli

ROOT = Path(__file__).resolve().parent.parent
SHORT = "the capital of france is [MASK]."                             # 9 tokens: fits 32
LONG = ("the river rises in the hills north of the town and runs south through farmland for most of its "
        "length and the mill itself was built more than two hundred years ago")   # > 32 tokens, < 64
TOO_LONG = " ".join([LONG] * 3)                                       # > 64 tokens
PACK_TEXTS = ["paris is the [MASK] of france.", "water [MASK] at one hundred degrees.",
              "she poured the [MASK] and sat down.", LONG.replace("mill", "[MASK]"), "a [MASK] network learns."]


# ----------------------------------------------------------------------------- helpers

def run_main(argv, capsys):
    """predict.main as the command line runs it: (exit code, stdout, stderr)."""
    capsys.readouterr()                                   # drop what came before (a conversion's report)
    with pytest.raises(SystemExit) as e:
        run_cli(predict.main, argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def run_json(argv, capsys) -> dict:
    code, out, err = run_main(argv + ["--json"], capsys)
    assert code == 0, err
    return json.loads(out)


def assert_one_line_error(code, err, message):
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


def assert_error(argv, capsys, message):
    code, _, err = run_main(argv, capsys)
    assert_one_line_error(code, err, message)


def tokenizer_of(folder):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def packages(tmp_path_factory, checkpoint_factory):
    """packages(task, max_texts=3, seq_len=(32, 64), shapes="enumerated") -> (package, checkpoint folder),
    converted once. task "fill-mask+encoder": a multi-function package of those tasks."""
    built = {}
    root = tmp_path_factory.mktemp("packages")

    def make(task, max_texts=3, seq_len=(32, 64), shapes="enumerated"):
        key = (task, max_texts, seq_len, shapes)
        if key not in built:
            if task == "embed":
                folder = root / "st"
                if not folder.exists():
                    build_sentence_transformers(folder, "tiny", "mean", 32, True)
            else:
                folder = checkpoint_factory("tiny", task.split("+")[0])
            output = root / f"{task}-{max_texts}-{'-'.join(map(str, seq_len))}-{shapes}.mlpackage"
            argv = [str(folder), "--task", *task.split("+"), "--seq-len", *map(str, seq_len), "--shapes", shapes,
                    "--skip-check", "-o", str(output)]
            if max_texts > 1:
                argv += ["--max-texts", str(max_texts)]
            with pytest.raises(SystemExit) as e:
                run_cli(convert.main, argv)
            assert e.value.code == 0, f"convert.py {' '.join(argv)} failed"
            built[key] = (output, folder)
        return built[key]

    return make


# ----------------------------------------------------------------------------- pure functions

def test_pack_groups_fill_greedily():
    assert predict.pack_groups([10, 10, 10], 32, 8) == [[0, 1, 2]]
    assert predict.pack_groups([10, 10, 10], 25, 8) == [[0, 1], [2]]
    assert predict.pack_groups([10, 10, 10], 64, 1) == [[0], [1], [2]]
    assert predict.pack_groups([10, 10, 10, 10], 64, 3) == [[0, 1, 2], [3]]
    assert predict.pack_groups([30, 5, 40, 64], 64, 3) == [[0, 1], [2], [3]]


def test_package_inputs_segment_ids():
    inputs = package_inputs([[1, 5, 2], [1, 6, 7, 2]], 10, 3)
    assert inputs["input_ids"].dtype == np.int32 and inputs["input_ids"].shape == (1, 10)
    assert inputs["input_ids"].tolist() == [[1, 5, 2, 1, 6, 7, 2, 3, 3, 3]]
    assert inputs["attention_mask"].tolist() == [[1, 1, 1, 2, 2, 2, 2, 0, 0, 0]]
    assert package_inputs([[1, 5, 2]], 4, 3)["attention_mask"].tolist() == [[1, 1, 1, 0]]


def test_classify_scores_per_problem_type():
    logits = np.array([1.0, -2.0, 0.5], dtype=np.float32)
    meta = {"labels": ["a", "b", "c"], "problem_type": "single_label_classification"}
    single = predict.classify_result(logits, meta)["labels"]
    assert [l["label"] for l in single] == ["a", "c", "b"] and abs(sum(l["score"] for l in single) - 1) < 1e-12
    multi = predict.classify_result(logits, {**meta, "problem_type": "multi_label_classification"})["labels"]
    assert [round(l["score"], 4) for l in multi] == [0.7311, 0.6225, 0.1192]
    value = predict.classify_result(np.array([0.25]), {"problem_type": "regression"})["labels"]
    assert value == [{"label": "LABEL_0", "score": 0.25}]


# ----------------------------------------------------------------------------- tasks

def test_fill_mask_top1_matches_float32_model(packages, capsys):
    from modernbert_ane.model import ModernBert
    package, folder = packages("fill-mask")
    texts = [SHORT, "water [MASK] at one hundred [MASK] celsius."]
    doc = run_json([str(package), *texts, "--top-k", "3"], capsys)
    assert doc["task"] == "fill-mask" and doc["backend"] == "emulate" and len(doc["results"]) == 2
    model, _ = ModernBert.from_pretrained(str(folder))
    tokenizer = tokenizer_of(folder)
    for text, result in zip(texts, doc["results"]):
        ids = tokenizer(text)["input_ids"]
        with torch.no_grad():
            probs = torch.softmax(model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0].double(), -1)
        positions = [i for i, t in enumerate(ids) if t == tokenizer.mask_token_id]
        assert [m["position"] for m in result["masks"]] == positions and result["num_tokens"] == len(ids)
        for mask in result["masks"]:
            preds = mask["predictions"]
            assert len(preds) == 3
            assert [p["probability"] for p in preds] == sorted([p["probability"] for p in preds], reverse=True)
            ref = probs[mask["position"]]
            assert preds[0]["id"] == int(ref.argmax())
            assert abs(preds[0]["probability"] - float(ref.max())) < 1e-2
            assert preds[0]["token"] == tokenizer.decode([preds[0]["id"]])


def test_fill_mask_human_output(packages, capsys):
    package, _ = packages("fill-mask")
    code, out, err = run_main([str(package), SHORT, "--top-k", "2"], capsys)
    assert code == 0 and "backend: float16 emulator" in err
    assert out.startswith(f"[1] {SHORT}") and "[MASK] at token 6:" in out
    assert len([line for line in out.splitlines() if line.startswith("      0.")]) == 2


def test_multi_length_package_picks_the_smallest_length_that_fits(packages, capsys):
    package, _ = packages("fill-mask")
    doc = run_json([str(package), SHORT, LONG.replace("mill", "[MASK]")], capsys)
    assert [r["length"] for r in doc["results"]] == [32, 64]
    assert doc["results"][1]["num_tokens"] > 32


def test_too_long_text_is_refused_or_truncated(packages, capsys):
    package, _ = packages("fill-mask")
    text = "[MASK] " + TOO_LONG
    n = len(tokenizer_of(packages("fill-mask")[1])(text)["input_ids"])
    code, _, err = run_main([str(package), SHORT, text], capsys)
    assert_one_line_error(code, err, f"text 2 is {n} tokens, {n - 64} too many")
    assert "largest length 64" in err
    code, out, err = run_main([str(package), SHORT, text, "--truncate", "--json"], capsys)
    assert code == 0 and f"text 2: truncated from {n} to 64 tokens" in err
    result = json.loads(out)["results"][1]
    assert result["num_tokens"] == 64 and result["length"] == 64 and result["masks"][0]["position"] == 1


def test_classify_labels_match_transformers(packages, capsys):
    import transformers
    package, folder = packages("classify")
    texts = [SHORT.replace("[MASK]", "paris"), LONG, "a neural network learns its weights."]
    doc = run_json([str(package), *texts], capsys)
    ref = transformers.ModernBertForSequenceClassification.from_pretrained(str(folder)).eval()
    tokenizer = tokenizer_of(folder)
    for text, result in zip(texts, doc["results"]):
        with torch.no_grad():
            probs = torch.softmax(ref(**tokenizer(text, return_tensors="pt")).logits[0].double(), -1)
        labels = result["labels"]
        assert {l["label"] for l in labels} == {"negative", "neutral", "positive"}
        assert labels[0]["label"] == ref.config.id2label[int(probs.argmax())]
        for l in labels:
            assert abs(l["score"] - float(probs[ref.config.label2id[l["label"]]])) < 1e-2
        assert abs(sum(l["score"] for l in labels) - 1) < 1e-6
    code, out, _ = run_main([str(package), texts[0]], capsys)
    assert code == 0 and "label" in out and "probability" in out
    assert all(name in out for name in ("negative", "neutral", "positive"))


def test_token_classify_labels_every_ordinary_token(packages, capsys):
    import transformers
    package, folder = packages("token-classify")
    text = "paris is the capital and largest city of france."
    doc = run_json([str(package), text], capsys)
    tokenizer = tokenizer_of(folder)
    ids = tokenizer(text)["input_ids"]
    tokens = doc["results"][0]["tokens"]
    ordinary = [i for i, t in enumerate(ids) if t not in tokenizer.all_special_ids]
    assert [t["position"] for t in tokens] == ordinary
    assert [t["token"] for t in tokens] == [text[t["start"]:t["end"]] for t in tokens]
    assert [t["token"] for t in tokens] == [tokenizer.decode([ids[i]]).removeprefix("##") for i in ordinary]
    ref = transformers.ModernBertForTokenClassification.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        probs = torch.softmax(ref(**tokenizer(text, return_tensors="pt")).logits[0].double(), -1)
    for t in tokens:
        top2 = probs[t["position"]].topk(2).values
        if top2[0] - top2[1] > 0.02:                                  # a clear winner survives float16
            assert t["label"] == ref.config.id2label[int(probs[t["position"]].argmax())]
    code, out, _ = run_main([str(package), text], capsys)
    lines = out.splitlines()[2:]
    assert code == 0 and len(lines) == len(doc["results"][0]["words"])
    assert all(line.split()[1] in ("O", "B-ENT", "I-ENT") for line in lines)


def test_encoder_shape_norms_and_full_json(packages, capsys):
    from modernbert_ane.model import ModernBert
    package, folder = packages("encoder")
    doc = run_json([str(package), LONG], capsys)
    result = doc["results"][0]
    n = result["num_tokens"]
    states = np.array(result["hidden_states"])
    assert result["shape"] == [n, 64] and states.shape == (n, 64) and len(result["norms"]) == n
    np.testing.assert_allclose(np.linalg.norm(states, axis=1), result["norms"], rtol=1e-6)
    model, _ = ModernBert.from_pretrained(str(folder))
    ids = tokenizer_of(folder)(LONG)["input_ids"]
    with torch.no_grad():
        ref = model(torch.tensor([ids]), torch.ones(1, n, dtype=torch.long))[0].double().numpy()
    cos = (ref * states).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(states, axis=1)
    assert cos.min() > 0.99
    code, out, _ = run_main([str(package), LONG], capsys)
    assert code == 0 and f"hidden states {n} x 64" in out and f"first 16 of {n}" in out
    assert len(out.splitlines()[-1].split()) == 16


def test_multi_function_package_runs_each_head_at_each_length(packages, capsys):
    package, _ = packages("fill-mask+encoder", max_texts=1)
    single, _ = packages("fill-mask")
    texts = [SHORT, LONG.replace("mill", "[MASK]")]
    default = run_json([str(package), *texts], capsys)
    assert (default["function"], default["task"]) == ("fill_mask", "fill-mask")
    assert [r["length"] for r in default["results"]] == [32, 64]
    assert default["results"] == run_json([str(single), *texts], capsys)["results"]   # the same head, same weights
    encoder = run_json([str(package), *texts, "--function", "encoder"], capsys)
    assert (encoder["function"], encoder["task"]) == ("encoder", "encoder")
    assert [r["length"] for r in encoder["results"]] == [32, 64]
    assert [r["shape"] for r in encoder["results"]] == [[r["num_tokens"], 64] for r in default["results"]]
    code, _, err = run_main([str(package), SHORT, "--function", "classify"], capsys)
    assert_one_line_error(code, err, "has no function 'classify' (it has fill_mask, encoder)")


def test_functions_package_runs_each_length_as_the_enumerated_one(packages, capsys):
    """--shapes functions: one fixed-shape function per (task, length), picked by the text's length, answering
    what the enumerated-shapes package answers, for each head; a function named alone runs its length only."""
    package, _ = packages("fill-mask+encoder", max_texts=1, shapes="functions")
    enumerated, _ = packages("fill-mask+encoder", max_texts=1)
    texts = [SHORT, LONG.replace("mill", "[MASK]")]
    meta = read_metadata(package)
    assert meta["shapes"] == "functions" and meta["function"] == "fill_mask" and meta["seq_lengths"] == [32, 64]
    assert meta["function_names"] == ["fill_mask_64", "fill_mask_32", "encoder_32", "encoder_64"]   # default first
    assert meta["length_functions"] == {32: "fill_mask_32", 64: "fill_mask_64"} and sorted(meta["cost"]) == ["32", "64"]
    assert Package(package).lengths("encoder") == [32, 64] and Package(package).lengths("encoder_32") == [32]
    for function in ("fill_mask", "encoder"):
        ours = run_json([str(package), *texts, "--function", function], capsys)
        theirs = run_json([str(enumerated), *texts, "--function", function], capsys)
        assert ours["function"] == function and [r["length"] for r in ours["results"]] == [32, 64]
        for a, b in zip(ours["results"], theirs["results"]):
            if function == "fill_mask":
                for mine, other in zip(a["masks"], b["masks"]):
                    assert [p["id"] for p in mine["predictions"]] == [p["id"] for p in other["predictions"]]
                    assert np.allclose([p["probability"] for p in mine["predictions"]],
                                       [p["probability"] for p in other["predictions"]], rtol=2e-3)
            else:
                assert a["shape"] == b["shape"] and np.allclose(a["norms"], b["norms"], rtol=2e-3)
    only = run_json([str(package), SHORT, "--function", "fill_mask_32"], capsys)
    assert only["function"] == "fill_mask_32" and only["results"][0]["length"] == 32
    assert_error([str(package), texts[1], "--function", "fill_mask_32"], capsys, "largest length 32")
    assert_error([str(package), SHORT, "--function", "fill_mask_16"], capsys,
                 "has no function 'fill_mask_16' (it has fill_mask, encoder, fill_mask_64, fill_mask_32, encoder_32, "
                 "encoder_64)")


def test_embed_vector_similarity_and_zero_shot(packages, capsys):
    from modernbert_ane.model import ModernBert
    package, folder = packages("embed")
    texts = ["paris is the capital of france.", "the capital of france is paris.", "water boils at one hundred."]
    doc = run_json([str(package), *texts], capsys)
    model, _ = ModernBert.from_pretrained(str(folder))
    tokenizer = tokenizer_of(folder)
    vectors = []
    for text, result in zip(texts, doc["results"]):
        vec = np.array(result["embedding"])
        ids = tokenizer(text)["input_ids"]
        with torch.no_grad():
            ref = model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)).reshape(-1, 32)[0].double()
        assert result["dimension"] == 32 and vec.shape == (32,) and abs(result["norm"] - 1) < 1e-2
        assert result["first_values"] == result["embedding"][:8]
        assert float(ref.numpy() @ vec / np.linalg.norm(vec) / ref.norm()) > 0.99
        vectors.append(vec / np.linalg.norm(vec))
    sim = np.array(doc["similarity"])
    assert sim.shape == (3, 3)
    np.testing.assert_allclose(sim, np.stack(vectors) @ np.stack(vectors).T, atol=1e-9)
    code, out, _ = run_main([str(package), *texts], capsys)
    assert code == 0 and "cosine similarity:" in out and "dimension 32" in out and "first values:" in out

    labels = ["capital city", "boiling water", "farm"]
    doc = run_json([str(package), *texts[::2], "--labels", ",".join(labels)], capsys)
    label_vectors = [np.array(r["embedding"]) for r in run_json([str(package), *labels], capsys)["results"]]
    assert "similarity" not in doc
    for vec, result in zip(vectors[::2], doc["results"]):
        ranked = result["labels"]
        assert sorted(l["label"] for l in ranked) == sorted(labels)
        assert [l["cosine"] for l in ranked] == sorted([l["cosine"] for l in ranked], reverse=True)
        for l in ranked:
            lv = label_vectors[labels.index(l["label"])]
            assert abs(l["cosine"] - float(vec @ lv / np.linalg.norm(lv))) < 1e-6
    code, out, _ = run_main([str(package), texts[0], "--labels", ",".join(labels)], capsys)
    assert code == 0 and "cosine" in out and all(label in out for label in labels)


# ----------------------------------------------------------------------------- --pack

def packed_and_unpacked(package, texts, capsys, extra=()):
    unpacked = run_json([str(package), *texts, *extra], capsys)
    packed = run_json([str(package), *texts, *extra, "--pack"], capsys)
    assert unpacked["predictions"] >= len(texts) > packed["predictions"]
    assert [r["text"] for r in packed["results"]] == texts
    return packed["results"], unpacked["results"]


def test_pack_fill_mask_equals_unpacked(packages, capsys):
    package, _ = packages("fill-mask")
    packed, unpacked = packed_and_unpacked(package, PACK_TEXTS, capsys)
    for p, u in zip(packed, unpacked):
        assert [m["position"] for m in p["masks"]] == [m["position"] for m in u["masks"]]
        for pm, um in zip(p["masks"], u["masks"]):
            assert pm["predictions"][0]["id"] == um["predictions"][0]["id"]
            for a, b in zip(pm["predictions"], um["predictions"]):
                assert abs(a["probability"] - b["probability"]) < 1e-2


def test_pack_encoder_and_token_classify_equal_unpacked(packages, capsys):
    texts = [t.replace("[MASK]", "word") for t in PACK_TEXTS]
    package, _ = packages("encoder")
    packed, unpacked = packed_and_unpacked(package, texts, capsys)
    for p, u in zip(packed, unpacked):
        np.testing.assert_allclose(p["hidden_states"], u["hidden_states"], atol=1e-2)
    package, _ = packages("token-classify")
    packed, unpacked = packed_and_unpacked(package, texts, capsys)
    for p, u in zip(packed, unpacked):
        assert [t["position"] for t in p["tokens"]] == [t["position"] for t in u["tokens"]]
        np.testing.assert_allclose([t["score"] for t in p["tokens"]], [t["score"] for t in u["tokens"]], atol=1e-2)


def test_pack_pooled_tasks_equal_unpacked(packages, capsys):
    texts = [t.replace("[MASK]", "word") for t in PACK_TEXTS]
    package, _ = packages("classify")
    packed, unpacked = packed_and_unpacked(package, texts, capsys)
    for p, u in zip(packed, unpacked):
        assert p["labels"][0]["label"] == u["labels"][0]["label"]
    package, _ = packages("embed")
    packed, unpacked = packed_and_unpacked(package, texts, capsys, ["--labels", "city,water"])
    for p, u in zip(packed, unpacked):
        a, b = np.array(p["embedding"]), np.array(u["embedding"])
        assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) >= 0.999
        assert [l["label"] for l in p["labels"]] == [l["label"] for l in u["labels"]]


def test_pack_needs_a_package_with_max_texts(packages, capsys):
    package, _ = packages("classify", max_texts=1, seq_len=(32,))
    doc = run_json([str(package), "great film", "dull film"], capsys)      # (1, L) or (1, 1, L): both read
    assert [len(r["labels"]) for r in doc["results"]] == [3, 3]
    code, _, err = run_main([str(package), "great film", "dull film", "--pack"], capsys)
    assert_one_line_error(code, err, "--max-texts N")


# ----------------------------------------------------------------------------- inputs and errors

def test_texts_from_file_and_stdin(packages, capsys, tmp_path, monkeypatch):
    package, _ = packages("classify")
    path = tmp_path / "texts.txt"
    path.write_text("great film\n\n   \ndull film\n", encoding="utf-8")
    doc = run_json([str(package), "--file", str(path)], capsys)
    assert [r["text"] for r in doc["results"]] == ["great film", "dull film"]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"one text\n\nanother\n")))
    doc = run_json([str(package), "-"], capsys)
    assert [r["text"] for r in doc["results"]] == ["one text", "another"]


def test_bad_input_gets_one_line_in_process(packages, capsys, tmp_path, monkeypatch):
    fill, _ = packages("fill-mask")
    classify, _ = packages("classify")
    not_utf8 = tmp_path / "latin1.txt"
    not_utf8.write_bytes("caf\xe9 [MASK]\n".encode("latin-1"))
    cases = {
        "not a package": ([str(tmp_path)], "is not an .mlpackage"),
        "empty text": ([str(fill), SHORT, ""], "text 2 is empty"),
        "whitespace text": ([str(fill), "   "], "text 1 is empty"),
        "no [MASK]": ([str(fill), "no mask here"], "text 1 has no [MASK] token"),
        "labels on classify": ([str(classify), "great film", "--labels", "a,b"], "--labels needs an embed package"),
        "top-k 0": ([str(fill), SHORT, "--top-k", "0"], "--top-k must be at least 1"),
        "not UTF-8": ([str(fill), "--file", str(not_utf8)], "is not UTF-8"),
        "bad tokenizer": ([str(fill), SHORT, "--tokenizer", str(tmp_path / "nope")], "pass --tokenizer"),
        "too long": ([str(fill), TOO_LONG], "too many for the package's largest length 64"),
    }
    for name, (argv, message) in cases.items():
        code, _, err = run_main(argv, capsys)
        assert_one_line_error(code, err, message)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\n  \n")))
    code, _, err = run_main([str(fill)], capsys)
    assert_one_line_error(code, err, "no texts")
    with pytest.raises(UserError, match="text 1 is empty"):                # --debug: the traceback instead
        run_cli(predict.main, [str(fill), "", "--debug"])


def foreign_packages(tmp_path):
    """A valid ML Program without our metadata, and one claiming a task predict.py does not know."""
    from coremltools.converters.mil import Builder as mb
    from modernbert_ane.coreml.quiet_coremltools import import_coremltools
    ct = import_coremltools()

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 2))])
    def prog(x):
        return mb.add(x=x, y=1.0)

    paths = {}
    for name, task in (("foreign", None), ("future", "translate")):
        mlmodel = ct.convert(prog, convert_to="mlprogram", skip_model_load=True)
        paths[name] = tmp_path / f"{name}.mlpackage"
        mlmodel.save(str(paths[name]))
        if task:
            package = Package(paths[name])
            package.write_metadata({"task": task})
            package.save()
    return paths


def test_foreign_and_future_packages(capsys, tmp_path):
    paths = foreign_packages(tmp_path)
    code, _, err = run_main([str(paths["foreign"]), "text"], capsys)
    assert_one_line_error(code, err, "was not written by this project's convert.py")
    code, _, err = run_main([str(paths["future"]), "text"], capsys)
    assert_one_line_error(code, err, "has task 'translate', which predict.py does not know")


def run_process(args, **kwargs):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(ROOT / "predict.py"), *args], capture_output=True, text=True,
                          env=env, **kwargs)


def test_as_a_process(packages, tmp_path):
    """As a user runs it: real processes, so nothing of pytest hides a traceback or feeds stdin."""
    result = run_process([str(tmp_path / "missing.mlpackage"), "text"])
    assert_one_line_error(result.returncode, result.stderr, "no such package")
    fill, _ = packages("fill-mask")
    result = run_process([str(fill)], stdin=subprocess.DEVNULL)
    assert_one_line_error(result.returncode, result.stderr, "no texts")
    result = run_process([str(fill), "--top-k", "1"], input=f"{SHORT}\n\nno mask here\n")
    assert_one_line_error(result.returncode, result.stderr, "text 2 has no [MASK] token")
    result = run_process([str(fill), "--top-k", "1"], input=f"{SHORT}\n")
    assert result.returncode == 0 and "backend: float16 emulator (1 text in 1 prediction)" in result.stderr
    assert "[MASK] at token 6:" in result.stdout


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="/dev/full (a device that is always full) is Linux's")
def test_stdout_full_or_closed(packages):
    """stdout on a full disk: one line, exit 2; stdout's reader gone (`| head -1`): quiet, exit 141."""
    fill, _ = packages("fill-mask")
    command = [sys.executable, str(ROOT / "predict.py"), str(fill), SHORT]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with open("/dev/full", "w") as full:
        result = subprocess.run(command, stdout=full, stderr=subprocess.PIPE, text=True, env=env)
    assert_one_line_error(result.returncode, result.stderr, "no space left to write standard output")
    assert result.stderr.splitlines()[-1].startswith("error:")
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(command, stdout=write_end, stderr=subprocess.PIPE, text=True, env=env)
    finally:
        os.close(write_end)
    assert result.returncode == 141 and "error" not in result.stderr and "Traceback" not in result.stderr


# ----------------------------------------------------------------------------- checkpoints shaped like the released ones

MODERNBERT_TOKENIZER = ROOT / "tests" / "data" / "modernbert-tokenizer"      # the released byte-level BPE tokenizer
MODERNBERT_IDS = dict(vocab_size=50368, pad_token_id=50283, cls_token_id=50281, sep_token_id=50282,
                      bos_token_id=50281, eos_token_id=50282)
ACCENTED = "Café déjà vu in Zürich, naïve!"


def with_modernbert_tokenizer(folder):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(MODERNBERT_TOKENIZER / name, folder / name)
    return folder


def convert_to(folder, output, *extra):
    argv = [str(folder), "--seq-len", "32", "--skip-check", "-o", str(output), *extra]
    with pytest.raises(SystemExit) as e:
        run_cli(convert.main, argv)
    assert e.value.code == 0, f"convert.py {' '.join(argv)} failed"
    return output


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """released(kind) -> (package, checkpoint folder): tiny checkpoints laid out like the released fine-tunes,
    converted once. "ner": a token classifier with the ModernBERT tokenizer and integer id2label values;
    "nli": a pair classifier (entailment / not_entailment) with the ModernBERT tokenizer; "embed-prompts": a
    sentence-transformers embedder declaring query/document prompts."""
    from checkpoints import build_checkpoint
    root, built = tmp_path_factory.mktemp("released"), {}

    def make(kind):
        if kind in built:
            return built[kind]
        folder = root / kind
        if kind == "embed-prompts":
            build_sentence_transformers(folder, "tiny", "mean", None, True)
            (folder / "config_sentence_transformers.json").write_text(json.dumps({
                "prompts": {"query": "search_query: ", "document": "search_document: "},
                "default_prompt_name": None}))
        else:
            task = "token-classify" if kind == "ner" else "classify"
            build_checkpoint(folder, "tiny", task, config_overrides=MODERNBERT_IDS)
            with_modernbert_tokenizer(folder)
            config = json.loads((folder / "config.json").read_text())
            if kind == "ner":
                config.update(id2label={"0": 0, "1": 1, "2": 2}, label2id={"0": 0, "1": 1, "2": 2})
            else:
                config.update(id2label={"0": "entailment", "1": "not_entailment"},
                              label2id={"entailment": 0, "not_entailment": 1}, num_labels=2)
                from safetensors.torch import load_file, save_file                  # a 2-label head
                tensors = load_file(str(folder / "model.safetensors"))
                for key in ("classifier.weight", "classifier.bias"):
                    tensors[key] = tensors[key][:2].contiguous()
                save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
            (folder / "config.json").write_text(json.dumps(config))
        built[kind] = (convert_to(folder, root / f"{kind}.mlpackage"), folder)
        return built[kind]

    return make


def test_integer_id2label_values_print_as_strings(released, capsys):
    package, _ = released("ner")
    doc = run_json([str(package), ACCENTED], capsys)
    assert {t["label"] for t in doc["results"][0]["tokens"]} <= {"0", "1", "2"}
    code, out, err = run_main([str(package), ACCENTED], capsys)
    assert code == 0, err
    assert read_metadata(package)["labels"] == ["0", "1", "2"]


def test_token_classify_prints_words_of_the_input_not_bpe_pieces(released, capsys):
    package, folder = released("ner")
    doc = run_json([str(package), ACCENTED], capsys)
    result = doc["results"][0]
    words = [w["word"] for w in result["words"]]
    assert words == ["Café", "déjà", "vu", "in", "Zürich", ",", "naïve", "!"]
    for item in result["words"] + result["tokens"]:
        text = item.get("word", item.get("token"))
        assert ACCENTED[item["start"]:item["end"]] == text and "Ġ" not in text and "Ã" not in text
    tokenizer = tokenizer_of(folder)
    pieces = tokenizer.convert_ids_to_tokens(tokenizer(ACCENTED)["input_ids"])
    assert any("Ã" in p or "Ġ" in p for p in pieces)                       # what was printed before
    positions = [p for w in result["words"] for p in w["positions"]]
    assert positions == [t["position"] for t in result["tokens"]] == list(range(1, len(pieces) - 1))
    for w in result["words"]:                                               # a word carries its first token's label
        first = next(t for t in result["tokens"] if t["position"] == w["positions"][0])
        assert (w["label"], w["score"]) == (first["label"], first["score"])
    code, out, _ = run_main([str(package), ACCENTED], capsys)
    assert code == 0 and [line.split()[0] for line in out.splitlines()[2:]] == words


def test_token_classify_words_with_a_wordpiece_tokenizer(packages, capsys):
    package, _ = packages("token-classify")
    text = "Paris, the capital-city of France."
    result = run_json([str(package), text], capsys)["results"][0]
    assert [w["word"] for w in result["words"]] == ["Paris", ",", "the", "capital", "-", "city", "of", "France", "."]
    assert all(text[w["start"]:w["end"]] == w["word"] for w in result["words"])


def test_text_pairs_are_tokenized_as_the_tokenizer_joins_them(released, capsys, tmp_path):
    import transformers
    package, folder = released("nli")
    premise, hypothesis = "A man is playing a guitar on stage.", "Someone is making music."
    doc = run_json([str(package), premise, "--pair", hypothesis], capsys)
    result = doc["results"][0]
    tokenizer = tokenizer_of(folder)
    ids = tokenizer(premise, hypothesis)["input_ids"]
    assert ids.count(tokenizer.sep_token_id) == 2 and result["num_tokens"] == len(ids) and result["pair"] == hypothesis
    ref = transformers.ModernBertForSequenceClassification.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        logits = ref(**tokenizer(premise, hypothesis, return_tensors="pt")).logits[0].double().numpy()
    np.testing.assert_allclose(result["logits"], logits, atol=2e-2)
    assert {l["label"] for l in result["labels"]} == {"entailment", "not_entailment"}
    texts = tmp_path / "pairs.tsv"                                          # a second column: its own pair
    texts.write_text(f"{premise}\t{hypothesis}\nA cat sleeps.\tAn animal rests.\n")
    from_file = run_json([str(package), "--file", str(texts)], capsys)["results"]
    assert from_file[0]["logits"] == result["logits"] and from_file[1]["pair"] == "An animal rests."
    code, out, _ = run_main([str(package), premise, "--pair", hypothesis], capsys)
    assert code == 0 and f"{premise}  |  {hypothesis}" in out


def test_pairs_need_a_classify_package(packages, released, capsys):
    package, _ = packages("fill-mask")
    assert_error([str(package), SHORT, "--pair", "x"], capsys, "--pair needs a classify")
    package, _ = released("nli")
    assert_error([str(package), "a\tb", "--pair", "c"], capsys, "use one of them")
    assert_error([str(package), "a", "--pair", " "], capsys, "--pair is empty")


def test_sentence_transformers_prompts_are_listed_and_applied(released, capsys):
    package, _ = released("embed-prompts")
    assert read_metadata(package)["prompts"] == {
        "prompts": {"document": "search_document: ", "query": "search_query: "}, "default": None}
    prompted = run_json([str(package), "what is rope?", "--prompt", "query"], capsys)["results"][0]
    by_hand = run_json([str(package), "search_query: what is rope?"], capsys)["results"][0]
    plain = run_json([str(package), "what is rope?"], capsys)["results"][0]
    assert prompted["embedding"] == by_hand["embedding"] != plain["embedding"]
    assert prompted["text"] == "what is rope?" and prompted["prompt"] == "query"
    assert_error([str(package), "x", "--prompt", "passage"], capsys,
                          "has no prompt 'passage' (it has document, query)")


def test_prompts_need_a_package_with_prompts(packages, capsys):
    package, _ = packages("embed")
    assert_error([str(package), "x", "--prompt", "query"], capsys, "with prompts")


def test_the_mask_token_is_named_as_the_tokenizer_names_it(packages, capsys, tmp_path):
    """A Gemma-vocabulary variant writes its mask <mask>: every message uses the tokenizer's name."""
    package, folder = packages("fill-mask")
    tok = tmp_path / "tok-angle-mask"
    tok.mkdir()
    for file in folder.glob("*token*.json"):
        (tok / file.name).write_text(file.read_text().replace("[MASK]", "<mask>"))
    code, out, err = run_main([str(package), "the capital of france is <mask>.", "--tokenizer", str(tok)], capsys)
    assert code == 0 and "<mask> at token 6:" in out and "[MASK]" not in out + err, err
    code, _, err = run_main([str(package), "the capital of france.", "--tokenizer", str(tok)], capsys)
    assert_one_line_error(code, err, "text 1 has no <mask> token to fill")


def test_token_ids_are_checked_against_the_vocabulary(packages, capsys):
    package, _ = packages("fill-mask")
    code, _, err = run_main([str(package), "the capital of France is [MASK].", "--tokenizer",
                             str(MODERNBERT_TOKENIZER)], capsys)
    assert_one_line_error(code, err, "text 1 has token id 50281, outside")


def test_metadata_is_checked_by_type_when_read(tmp_path):
    from modernbert_ane.coreml.package import PackageError, check_metadata
    good = {"task": "classify", "labels": ["a", 1, True], "vocab_size": 10, "pad_token_id": 3}
    assert check_metadata(dict(good), "p")["labels"] == ["a", "1", "true"]
    for bad in ({"labels": "a,b"}, {"labels": [{"x": 1}]}, {"seq_lengths": [0]}, {"vocab_size": 1.5},
                {"max_texts": "2"}, {"normalized": "yes"}, {"pad_token_id": 10}, {"prompts": {"prompts": {"q": 1}}}):
        with pytest.raises(PackageError, match="damaged metadata"):
            check_metadata({**good, **bad}, "p")


def test_token_spans_without_offsets():
    """A tokenizer without offsets (a Python one): each token's decoded text is found in order in the input."""
    from checkpoints import build_tokenizer
    fast = build_tokenizer()

    class WithoutOffsets:
        is_fast, all_special_ids, unk_token_id = False, fast.all_special_ids, fast.unk_token_id

        def decode(self, ids):
            return fast.decode(ids)
    text = "paris is the capital of france."
    ids = fast(text)["input_ids"]
    spans = predict.token_spans(WithoutOffsets(), text, ids)
    assert spans[0] is None and spans[-1] is None                           # [CLS], [SEP]
    pieces = [text[s:e] for s, e, _ in spans[1:-1]]
    assert "".join(pieces) == text.replace(" ", "") and all(p.strip() == p and p for p in pieces)
    assert [s[:2] for s in spans[1:-1]] == [s[:2] for s in predict.token_spans(fast, text, ids)[1:-1]]


def test_predict_runs_without_importing_torch():
    """predict.py needs the tokenizer, the package and NumPy: importing it loads neither torch nor model.py, so a
    prediction starts fast and an app-side install needs no torch."""
    code = "import sys, modernbert_ane.predict; print(sorted(m for m in ('torch', 'modernbert_ane.model') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr
