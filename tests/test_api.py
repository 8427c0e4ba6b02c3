"""modernbert_ane/api.py: convert, Predictor and compare run the scripts' own code paths on a test checkpoint."""
import numpy as np
import pytest

from checkpoints import build_sentence_transformers
from modernbert_ane.api import Predictor, UserError, compare, convert


@pytest.fixture(scope="module")
def fill_mask(tmp_path_factory, checkpoint_factory):
    folder = checkpoint_factory("tiny", "fill-mask")
    output = tmp_path_factory.mktemp("api") / "tiny.mlpackage"
    return convert(folder, output, seq_len=[32], rotation="none", skip_check=True), folder


def test_convert_returns_the_package_it_wrote(fill_mask):
    package, _ = fill_mask
    assert package.name == "tiny.mlpackage" and (package / "Manifest.json").is_file()


def test_convert_refuses_what_the_script_refuses(fill_mask, tmp_path):
    package, folder = fill_mask
    with pytest.raises(UserError, match="--force"):
        convert(folder, package, seq_len=[32], rotation="none", skip_check=True)
    with pytest.raises(UserError, match="invalid choice"):
        convert(folder, tmp_path / "x.mlpackage", rotation="sideways")
    with pytest.raises(TypeError, match="unknown option 'sequence_length'"):
        convert(folder, tmp_path / "x.mlpackage", sequence_length=32)
    assert not (tmp_path / "x.mlpackage").exists()


def test_predictor_fill_mask_matches_the_script_document(fill_mask):
    package, _ = fill_mask
    predictor = Predictor(package, backend="emulate")
    texts = ["The cat sat on the [MASK].", "A [MASK] of tea."]
    top = predictor.fill_mask(texts, top_k=3)
    doc = predictor.run(texts, top_k=3)
    assert [len(masks) for masks in top] == [1, 1] and all(len(m[0]) == 3 for m in top)
    assert top[0][0] == doc["results"][0]["masks"][0]["predictions"]
    probabilities = [p["probability"] for p in top[1][0]]
    assert probabilities == sorted(probabilities, reverse=True)
    with pytest.raises(UserError, match="fill-mask package, not embed"):
        predictor.embed(texts)


def test_predictor_embed_returns_the_vectors(tmp_path):
    folder = tmp_path / "st"
    build_sentence_transformers(folder, "tiny", "mean", 32, True)
    package = convert(folder, tmp_path / "st.mlpackage", seq_len=[32], rotation="none", skip_check=True)
    vectors = Predictor(package, backend="emulate").embed(["one text", "another text", "one text"])
    assert vectors.shape == (3, 32) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=2e-3)     # Normalize module
    np.testing.assert_array_equal(vectors[0], vectors[2])


def test_compare_returns_the_metrics_of_both_diff_scripts(fill_mask):
    package, folder = fill_mask
    coreml = compare(package, backend="emulate", max_kl=1.0)
    assert coreml["kl_mean"] < 1e-3 and coreml["task"] == "fill-mask" and coreml["backend"] == "emulate"
    torch_metrics = compare(folder, rotation="none", max_length=32)
    assert torch_metrics["kl_mean"] < 1e-6 and torch_metrics["precision"] == "float32"
    with pytest.raises(TypeError):
        compare(package, json="m.json")
