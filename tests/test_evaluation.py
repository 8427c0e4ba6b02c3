"""evaluation.py: per-row measures (chunked), the delimiter rule, per-token records and the gates."""
import numpy as np
import pytest

from modernbert_ane import evaluation
from modernbert_ane.evaluation import TokenRecords, delimiter_tokens, row_measures, summarize
from modernbert_ane.user_errors import UserError


class Tokenizer:
    """What the accounting reads of a tokenizer."""
    cls_token_id, sep_token_id = 1, 2

    def convert_ids_to_tokens(self, ids):
        return [{1: "[CLS]", 2: "[SEP]"}.get(i, f"t{i}") for i in ids]


def logits(n=70, v=50, seed=0):
    rng = np.random.default_rng(seed)
    ref = rng.normal(size=(n, v)).astype(np.float32) * 3
    return ref, ref + rng.normal(size=(n, v)).astype(np.float32) * 0.05


def test_chunked_measures_equal_the_whole_at_once(monkeypatch):
    ref, ours = logits()
    whole = evaluation.kl_per_row(ref, ours)
    monkeypatch.setattr(evaluation, "ROW_CHUNK", 7)                    # 70 rows in 10 chunks
    rows = row_measures("kl", ref, ours)
    np.testing.assert_allclose(rows["kl"], whole, rtol=1e-12)
    top1 = (ref.argmax(-1) == ours.argmax(-1)).mean()
    assert summarize("kl", rows)["top1_agreement"] == top1 and 0.5 < top1 < 1.0
    assert rows["max_abs_diff"].shape == (70,) and rows["nonfinite"].sum() == 0


def test_non_finite_rows_are_infinitely_wrong_and_counted():
    ref, ours = logits(n=4)
    ours[2, 5] = np.nan
    rows = row_measures("kl", ref, ours)
    assert np.isinf(rows["kl"][2]) and rows["top1"][2] == 0 and rows["nonfinite"].tolist() == [0, 0, 1, 0]
    assert np.isinf(evaluation.row_error("kl", rows)[2])


def test_one_label_heads_are_compared_by_score_error():
    assert evaluation.output_measure("classify", 1) == "score" and evaluation.output_measure("classify", 3) == "kl"
    assert evaluation.output_measure("token-classify", 1) == "score"
    assert evaluation.output_measure("embed", 1) == "cosine"
    ref, ours = np.array([[2.0], [-0.5], [0.0]]), np.array([[2.1], [-0.5], [1e-4]])
    m = summarize("score", row_measures("score", ref, ours))
    assert "kl_mean" not in m                                              # softmax over one label: always 0
    assert m["score_abs_error_max"] == pytest.approx(0.1) and m["score_abs_error_mean"] == pytest.approx(0.1001 / 3)
    assert m["score_rel_error_max"] == pytest.approx(0.1)                 # 0.1 / 2.1 is less than 1e-4 / 1e-3
    assert m["score_rel_error_max"] >= 1e-4 / evaluation.SCORE_FLOOR - 1e-12


def test_delimiters_are_cls_sep_and_massive_tokens():
    ids = np.array([1, 7, 8, 9, 10, 2])
    peaks = np.array([3e4, 3.0, 4.0, 500.0, 3.5, 2.0])                  # token 9 carries a massive activation
    assert delimiter_tokens(Tokenizer(), ids, peaks).tolist() == [True, False, False, True, False, True]
    assert not delimiter_tokens(Tokenizer(), ids[1:5], np.array([3.0, 4.0, 30.0, 3.5])).any()   # < 10x median


def test_records_split_delimiters_and_name_the_worst_token():
    accounting = evaluation.Accounting("fill-mask", 50, Tokenizer())
    for text, seed in ((1, 0), (2, 1)):
        ref, ours = logits(n=6, seed=seed)
        if text == 2:
            ours[3] += np.linspace(0, 5, 50, dtype=np.float32)              # token 3 of text 2 is far off
        ids = np.array([1, 11, 12, 13, 14, 2])
        accounting.add(text, ids, np.array([3e4, 1, 1, 1, 1, 1.0]), ref, ours)
    m = accounting.metrics()
    assert m["delimiter_tokens"]["tokens"] == 4 and m["ordinary_tokens"]["tokens"] == 8
    assert m["worst_token"] == {**m["worst_token"], "text": 2, "position": 3, "token": "t13", "token_id": 13,
                                "delimiter": False}
    assert m["worst_token"]["kl"] == m["kl_max"] == m["ordinary_tokens"]["kl_max"]
    assert m["delimiter_tokens"]["kl_max"] < m["kl_max"]
    rows = accounting.text_rows()
    assert [r["worst_token"]["position"] for r in rows][1] == 3 and rows[1]["kl_max"] == m["kl_max"]
    panels = accounting.panels()
    assert [p["tokens"][0] for p in panels] == ["[CLS]", "[CLS]"] and panels[1]["delimiter"].sum() == 2


def test_pooled_records_per_text_and_the_cls_row():
    accounting = evaluation.Accounting("classify", 3, Tokenizer(), cls_pooled=True)
    rng = np.random.default_rng(0)
    for text in (1, 2, 3):
        enc = rng.normal(size=(5, 8))
        ours_enc = enc + (0.5 if text == 3 else 0.0) * np.eye(5, 8)      # text 3: its [CLS] row is off
        out = rng.normal(size=(1, 3))
        shifted = out + 0.01 * text * np.array([1.0, 0, -1])              # a shift of every logit alike: KL 0
        accounting.add(text, np.array([1, 5, 6, 7, 2]), np.ones(5), out, shifted, enc, ours_enc)
    m = accounting.metrics()
    assert m["worst_text"]["text"] == 3 and "position" not in m["worst_text"]
    assert m["cls_row"]["worst_text"] == 3 and m["cls_row"]["cosine_min"] < 0.999
    assert m["token_output"] == "encoder output (final norm)" and m["delimiter_tokens"]["tokens"] == 6
    assert {p["output"] for p in accounting.panels()} == {float(e[0]) for e in accounting.outputs.errors()}


def test_gates_refuse_what_cannot_apply_and_fail_above_the_limit():
    with pytest.raises(UserError, match="--max-kl does not apply .* one-label score.*--max-score-error"):
        evaluation.check_gates("score", 0.1, None, "x")
    with pytest.raises(UserError, match="--max-score-error does not apply .* distribution"):
        evaluation.check_gates("kl", None, 0.1, "x")
    with pytest.raises(UserError, match="cosine"):
        evaluation.check_gates("cosine", 0.1, None, "x")
    with pytest.raises(UserError, match=">= 0"):
        evaluation.check_gates("kl", float("nan"), None, "x")
    evaluation.check_gates("kl", 0.1, None, "x")
    gates = evaluation.gate_results({"kl_mean": 0.2}, 0.1, None)
    assert gates == [{"flag": "--max-kl", "metric": "kl_mean", "limit": 0.1, "value": 0.2, "passed": False}]
    assert evaluation.gate_results({"score_abs_error_max": 0.05}, None, 0.1)[0]["passed"]
    assert not evaluation.gate_results({"kl_mean": float("nan")}, 0.1, None)[0]["passed"]


def test_records_reject_an_unknown_measure():
    with pytest.raises(AssertionError):
        TokenRecords("psnr")


def test_valid_rows_are_a_view_when_padding_comes_last():
    x = np.arange(12.0).reshape(4, 3)
    right = evaluation.valid_rows(x, np.array([1, 1, 1, 0], bool))
    assert np.shares_memory(right, x) and right.tolist() == x[:3].tolist()
    left = evaluation.valid_rows(x, np.array([0, 1, 1, 1], bool))
    assert left.tolist() == x[1:].tolist()
