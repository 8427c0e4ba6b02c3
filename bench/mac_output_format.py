"""The README's "On a Mac" sample output: what predict.py, diff_coreml.py and bench_device.py print with Core ML,
made by the very functions that print it (mlpackage.describe_backend, predict.backend_line,
diff_coreml.running_line / format_placement_section, bench_device.format_results), fed with SYNTHETIC numbers.

    python bench/mac_output_format.py          # the README's block, between its markers

No Mac was available to this project: these are the format, not a measurement (every time is a round
placeholder, the shares follow from fabricated compute-plan records). tests/test_bench_device.py checks that
the README holds exactly this output, so the README cannot drift from the code.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from bench_device import format_results, tflops  # noqa: E402
from modernbert_ane.diff_coreml import format_placement_section, running_line  # noqa: E402
from modernbert_ane.coreml.placement import placement_summary  # noqa: E402
from modernbert_ane.coreml.runner import describe_backend  # noqa: E402
from modernbert_ane.predict import backend_line  # noqa: E402

PACKAGE = "fill.mlpackage"
BEGIN, END = "<!-- begin: python bench/mac_output_format.py -->", "<!-- end: python bench/mac_output_format.py -->"
# load reports as mlpackage.load_coreml returns them: compiled into the cache, loaded from it, --no-cache
MISS = {"compute_units": "cpu-and-ne", "cache": "miss", "hash_s": 0.1, "compile_s": 10.0, "load_s": 1.0}
HIT = {"compute_units": "cpu-and-ne", "cache": "hit", "hash_s": 0.1, "compile_s": 0.0, "load_s": 1.0}
OFF = {"compute_units": "cpu-and-ne", "cache": "off", "hash_s": 0.0, "compile_s": 0.0, "load_s": 10.0}
# compute-plan records as mlpackage.compute_plan_records returns them, and their FLOPs (coreml/cost.py)
RECORDS = ([{"name": f"conv_{i}", "op_type": "conv", "device": "neural_engine"} for i in range(4)] +
           [{"name": "scores", "op_type": "einsum", "device": "neural_engine"},
            {"name": "ids", "op_type": "cast", "device": "cpu"},
            {"name": "embeddings", "op_type": "gather", "device": "cpu"},
            {"name": "probs", "op_type": "softmax", "device": "gpu"}])
FLOPS = {**{f"conv_{i}": 2 * 10**9 for i in range(4)}, "scores": 10**9, "probs": 10**9}


def bench_doc() -> dict:
    """A bench_device.py --json document: two compute-unit settings, two lengths."""
    flops = {128: 2 * 10**10, 512: 8 * 10**10}
    latency = [{"compute_units": units, "length": n, "runs": 20, "median_ms": ms, "min_ms": ms * 0.9,
                "max_ms": ms * 1.5, "tflops": tflops(flops[n], ms)}
               for units, scale in (("cpu-and-ne", 1), ("all", 2)) for n, ms in ((128, 10.0 * scale), (512, 40.0 * scale))]
    summary = placement_summary(RECORDS, FLOPS)
    return {"package": PACKAGE, "function": "main", "lengths": [128, 512], "flops": flops,
            "loads": {units: {"first_load_s": 10.0, "cached_load_s": 1.0, "compiled_path": "x.mlmodelc"}
                      for units in ("cpu-and-ne", "all")},
            "latency": latency, "placement": {"cpu-and-ne": summary, "all": summary}}


def sample() -> str:
    """The README block: each command, then what it prints (Markdown)."""
    summary = placement_summary(RECORDS, FLOPS)
    blocks = [
        ("python predict.py fill.mlpackage \"The capital of France is [MASK].\"  # stderr: first run, later runs, --no-cache",
         [backend_line(describe_backend("coreml", "cpu-and-ne", r), 1, 0, 1) for r in (MISS, HIT, OFF)]),
        ("python diff_coreml.py fill.mlpackage --compute-units all --report r/  # stderr's first line; stdout after the metrics",
         [running_line(PACKAGE, "coreml", describe_backend("coreml", "all", {**HIT, "compute_units": "all"})), "...",
          format_placement_section({"all": summary}, "Core ML's compute plan of ~/Library/Caches/modernbert-ane/"
                                                     "<hash>.mlmodelc")]),
        ("python bench/bench_device.py fill.mlpackage --compute-units cpu-and-ne all  # stdout",
         [format_results(bench_doc())]),
    ]
    parts = [BEGIN]
    for command, lines in blocks:
        parts += ["```bash", command, "```", "```", *lines, "```"]
    return "\n".join(parts + [END])


if __name__ == "__main__":
    print(sample())
