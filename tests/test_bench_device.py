"""bench/bench_device.py: its aggregation and formatting on fabricated compute-plan records and timings (the
measuring itself needs a Mac)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import bench_device  # noqa: E402

RECORDS = [  # what mlpackage.compute_plan_records returns
    {"name": "qkv", "op_type": "conv", "device": "neural_engine", "supported": ["neural_engine", "cpu"], "cost": 0.5},
    {"name": "scores", "op_type": "einsum", "device": "neural_engine", "supported": ["neural_engine"], "cost": 0.2},
    {"name": "ids16", "op_type": "cast", "device": "cpu", "supported": ["cpu"], "cost": 0.0},
    {"name": "emb", "op_type": "gather", "device": "cpu", "supported": ["cpu", "gpu"], "cost": 0.1},
    {"name": "emb2", "op_type": "gather", "device": "gpu", "supported": ["cpu", "gpu"], "cost": 0.1},
    {"name": "odd", "op_type": "topk", "device": None, "supported": [], "cost": None},
]
FLOPS = {"qkv": 600, "scores": 200, "ids16": 0, "emb": 0, "emb2": 0, "odd": 200}


def test_placement_summary_shares_and_fallbacks():
    s = bench_device.placement_summary(RECORDS, FLOPS)
    assert s["ops"] == 6
    assert s["ops_by_device"] == {"cpu": 2, "gpu": 1, "neural_engine": 2, "unknown": 1}
    assert s["neural_engine_op_share"] == pytest.approx(2 / 6)
    assert s["neural_engine_flop_share"] == pytest.approx(800 / 1000)
    assert list(s["fallbacks"]) == ["gather", "cast", "topk"]          # most ops first, then by name
    assert s["fallbacks"]["gather"] == {"count": 2, "flops": 0, "devices": {"cpu": 1, "gpu": 1},
                                        "examples": ["emb", "emb2"]}
    assert s["fallbacks"]["topk"]["devices"] == {"unknown": 1} and s["fallbacks"]["topk"]["flops"] == 200


def test_placement_without_flop_counts_or_records():
    assert bench_device.placement_summary(RECORDS, {})["neural_engine_flop_share"] is None
    empty = bench_device.placement_summary([], {})
    assert empty["neural_engine_op_share"] is None and empty["fallbacks"] == {}
    assert "every op on the Neural Engine" in bench_device.format_placement("cpu-and-ne", {**empty, "ops_by_device": {}})


def test_format_placement_names_each_fallback_type():
    text = bench_device.format_placement("cpu-and-ne", bench_device.placement_summary(RECORDS, FLOPS))
    lines = text.splitlines()
    assert lines[0] == ("cpu-and-ne: 6 ops (cpu 2, gpu 1, neural_engine 2, unknown 1); on the Neural Engine: "
                        "33.3 % of ops, 80.0 % of FLOPs")
    assert lines[1] == "  off the Neural Engine: gather x2 (cpu 1, gpu 1; 0 GFLOP), e.g. emb, emb2"
    assert len(lines) == 4


def test_latency_stats_and_throughput():
    stats = bench_device.latency_stats([0.010, 0.012, 0.030, 0.011])
    assert stats == {"runs": 4, "median_ms": pytest.approx(11.5), "min_ms": pytest.approx(10.0),
                     "max_ms": pytest.approx(30.0)}
    assert bench_device.tflops(3 * 10**12, 1000.0) == pytest.approx(3.0)      # 3 TFLOP in one second
    assert bench_device.tflops(None, 5.0) is None


def test_format_latency_and_loads():
    rows = [{"compute_units": "cpu-and-ne", "length": 512, "runs": 20, "median_ms": 12.345, "min_ms": 11.0,
             "max_ms": 15.5, "tflops": 2.9876}]
    assert bench_device.format_latency(rows).splitlines()[2] == \
        "| cpu-and-ne | 512 | 12.35 ms | 11.00 ms | 15.50 ms | 2.99 |"
    loads = {"cpu-and-ne": {"first_load_s": 41.2, "cached_load_s": 0.81, "compiled_path": "x.mlmodelc"}}
    assert bench_device.format_loads(loads) == \
        "cpu-and-ne: first load 41.20 s (compile + load), cached load 0.81 s"


def test_flop_counts_prefer_the_metadata():
    meta = {"cost": {"512": {"flops": 123}}}
    assert bench_device.flop_counts("unused.mlpackage", meta, [512]) == {512: 123}


def test_arguments():
    args = bench_device.build_parser().parse_args(["p.mlpackage", "--compute-units", "all", "cpu-and-ne",
                                                   "--seq-len", "128", "512"])
    assert args.compute_units == ["all", "cpu-and-ne"] and args.seq_len == [128, 512] and args.runs == 20
    assert bench_device.build_parser().parse_args(["p.mlpackage"]).compute_units == ["cpu-and-ne"]
    with pytest.raises(SystemExit) as e:
        bench_device.build_parser().parse_args(["p.mlpackage", "--compute-units", "gpu"])
    assert e.value.code == 2


def test_readme_shows_what_the_formatting_functions_print():
    """The README's "On a Mac" sample output is bench/mac_output_format.py's output, verbatim: the format the
    scripts print (synthetic numbers), so it cannot drift from the code."""
    import mac_output_format
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    begin, end = readme.index(mac_output_format.BEGIN), readme.index(mac_output_format.END)
    assert readme[begin:end + len(mac_output_format.END)] == mac_output_format.sample()
    sample = mac_output_format.sample()
    assert "| cpu-and-ne | 512 | 40.00 ms | 36.00 ms | 60.00 ms | 2.00 |" in sample     # 8e10 FLOP in 40 ms
    assert "on the Neural Engine: 62.5 % of ops, 90.0 % of FLOPs" in sample          # 5 of 8 ops, 9 of 10 GFLOP
    assert "backend: Core ML (cpu-and-ne, loaded from the cache in 1.0 s (hash 0.1 s)) (1 text in 1 prediction)" in sample
    doc = mac_output_format.bench_doc()
    assert bench_device.format_results(doc).splitlines()[:3] == [
        "cpu-and-ne: first load 10.00 s (compile + load), cached load 1.00 s",
        "all: first load 10.00 s (compile + load), cached load 1.00 s",
        "| compute units | length | median | min | max | TFLOP/s |"]
