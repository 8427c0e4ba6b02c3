"""coreml/placement.py: compute-plan records and per-op FLOPs summed into Neural Engine shares and fallbacks,
and the summary in words (the lines diff_coreml.py and bench_device.py print)."""
from modernbert_ane.coreml.placement import format_placement, placement_summary

PLACEMENT_RECORDS = [  # what coreml/macos.py's compute_plan_records returns on a Mac
    {"name": "qkv", "op_type": "conv", "device": "neural_engine", "supported": ["neural_engine"], "cost": 0.6},
    {"name": "scores", "op_type": "einsum", "device": "neural_engine", "supported": ["neural_engine"], "cost": 0.2},
    {"name": "emb", "op_type": "gather", "device": "cpu", "supported": ["cpu"], "cost": 0.0},
    {"name": "emb_<2>", "op_type": "gather", "device": "gpu", "supported": ["cpu", "gpu"], "cost": 0.0},
    {"name": "probs", "op_type": "softmax", "device": "cpu", "supported": ["cpu"], "cost": 0.2},
]


def test_summary_counts_shares_and_groups_fallbacks_by_type():
    summary = placement_summary(PLACEMENT_RECORDS, {"qkv": 6e9, "scores": 2e9, "probs": 2e9, "elsewhere": 5e9})
    assert summary["ops"] == 5 and summary["ops_by_device"] == {"cpu": 2, "gpu": 1, "neural_engine": 2}
    assert summary["neural_engine_op_share"] == 2 / 5
    assert summary["neural_engine_flop_share"] == 8e9 / 10e9               # FLOPs of ops not in the plan ignored
    assert list(summary["fallbacks"]) == ["gather", "softmax"]                # most ops first
    assert summary["fallbacks"]["gather"] == {"count": 2, "flops": 0, "devices": {"cpu": 1, "gpu": 1},
                                              "examples": ["emb", "emb_<2>"]}
    assert placement_summary([], {})["neural_engine_op_share"] is None


def test_summary_in_words():
    lines = format_placement("cpu-and-ne", placement_summary(PLACEMENT_RECORDS, {"qkv": 6e9, "probs": 2e9})).splitlines()
    assert lines[0] == ("cpu-and-ne: 5 ops (cpu 2, gpu 1, neural_engine 2); on the Neural Engine: 40.0 % of ops, "
                        "75.0 % of FLOPs")
    assert lines[1] == "  off the Neural Engine: gather x2 (cpu 1, gpu 1; 0 GFLOP), e.g. emb, emb_<2>"
    assert lines[2] == "  off the Neural Engine: softmax x1 (cpu 1; 2 GFLOP), e.g. probs"
    only_ne = format_placement("all", placement_summary(PLACEMENT_RECORDS[:2], {}))
    assert only_ne.endswith("n/a of FLOPs\n  every op on the Neural Engine")
