"""coreml/readiness.py: the summary's FLOP and byte lines (coreml/cost.py's counts)."""
from modernbert_ane.coreml.readiness import Readiness

SUMMARY = {"flops": 2_500_000_000, "flops_by_category": {"conv": 2_000_000_000, "matmul": 500_000_000},
           "weight_bytes": 3 * 2**20, "activation_bytes_written": 5 * 2**20,
           "largest_activation": {"op": "logits", "op_type": "transpose", "shape": [1, 512, 50368],
                                  "bytes": 512 * 50368 * 2}}


def test_report_has_one_cost_line_per_length(tmp_path):
    (tmp_path / "Data").mkdir()
    report = Readiness().report(tmp_path, 512, {"fill-mask": {128: SUMMARY, 512: SUMMARY}})
    lines = report.splitlines()
    cost = [l for l in lines if "GFLOP" in l]
    assert cost == ["  at 128 tokens: 2.5 GFLOP (conv 2, matmul 0.5); weights read 3.0 MiB, activations written 5.0 MiB",
                    "  at 512 tokens: 2.5 GFLOP (conv 2, matmul 0.5); weights read 3.0 MiB, activations written 5.0 MiB"]
    assert "    largest activation: transpose logits (1, 512, 50368), 49.2 MiB" in lines


def test_report_names_the_function_of_a_multi_function_package(tmp_path):
    (tmp_path / "Data").mkdir()
    report = Readiness().report(tmp_path, 512, {"fill-mask": {512: SUMMARY}, "embed": {512: SUMMARY}})
    assert any(l.startswith("  embed: at 512 tokens") for l in report.splitlines())
    assert "GFLOP" not in Readiness().report(tmp_path, 512)
