"""Benchmark a package on this Mac's Core ML: latency, load times, TFLOP/s and where the ops run.

    python bench/bench_device.py PACKAGE [--seq-len N ...] [--compute-units cpu-and-ne all ...]
                                 [--runs 20] [--warmup 3] [--function NAME] [--json bench.json] [--force]

For each compute-unit setting: the first load (MLModel: compile, then load; what every load costs without
the cache) and the cached load (CompiledMLModel on the compiled copy in the cache, mlpackage.load_coreml);
per sequence length, `--warmup` untimed predictions then `--runs` timed ones (median, min, max), and the
throughput from the package's own FLOP count (coreml/cost.py: the metadata's `cost`, or counted now);
then Core ML's compute plan (MLComputePlan, macOS 14.4+): the share of ops and of FLOPs it places on the
Neural Engine, and every op that falls back, grouped by type (of the function that runs the largest length: a
`--shapes functions` package has one per length). macOS only: elsewhere it says so in one line.

The aggregation and formatting take plain data (lists of dicts), so they are tested on Linux
(tests/test_bench_device.py) with fabricated records; only `measure_*` call Core ML. The placement's aggregation
and wording are coreml/placement.py's (placement_summary, format_placement), shared with diff_coreml.py's report.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from modernbert_ane.coreml.macos import COMPUTE_UNITS, DEFAULT_COMPUTE_UNITS, compute_plan_records  # noqa: E402
from modernbert_ane.coreml.package import Package, package_inputs  # noqa: E402
from modernbert_ane.coreml.placement import format_placement, per_op_flops, placement_summary  # noqa: E402
from modernbert_ane.coreml.runner import PackageRunner  # noqa: E402
from modernbert_ane.user_errors import UserError, run_cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("package", help="an .mlpackage written by convert.py")
    p.add_argument("--seq-len", type=int, nargs="+", metavar="N", help="lengths to time (default: every length it has)")
    p.add_argument("--compute-units", nargs="+", choices=tuple(COMPUTE_UNITS), default=[DEFAULT_COMPUTE_UNITS],
                   help=f"Core ML compute-unit settings to compare (default {DEFAULT_COMPUTE_UNITS})")
    p.add_argument("--runs", type=int, default=20, help="timed predictions per length (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed predictions first (default 3)")
    p.add_argument("--function", metavar="NAME", help="the head of a multi-function package (default: its default)")
    p.add_argument("--no-placement", action="store_true", help="skip the compute plan (op placement)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


# ----------------------------------------------------------------------------- plain data: tested on Linux


def latency_stats(seconds: list[float]) -> dict:
    """median / min / max in milliseconds over timed runs."""
    ms = [s * 1e3 for s in seconds]
    return {"runs": len(ms), "median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms)}


def tflops(flops: int | None, median_ms: float) -> float | None:
    """Throughput at the median latency, in TFLOP/s (10^12 FLOP per second)."""
    return None if not flops or median_ms <= 0 else flops / (median_ms * 1e-3) / 1e12


def format_latency(rows: list[dict]) -> str:
    """A Markdown table of the latency rows (compute_units, length, median/min/max ms, TFLOP/s)."""
    lines = ["| compute units | length | median | min | max | TFLOP/s |", "|---|---|---|---|---|---|"]
    for r in rows:
        tf = "n/a" if r["tflops"] is None else f"{r['tflops']:.2f}"
        lines.append(f"| {r['compute_units']} | {r['length']} | {r['median_ms']:.2f} ms | {r['min_ms']:.2f} ms | "
                     f"{r['max_ms']:.2f} ms | {tf} |")
    return "\n".join(lines)


def format_loads(loads: dict) -> str:
    """compute units -> {first_load_s, cached_load_s}: one line each."""
    return "\n".join(f"{units}: first load {l['first_load_s']:.2f} s (compile + load), cached load "
                     f"{l['cached_load_s']:.2f} s" for units, l in loads.items())


def format_results(doc: dict) -> str:
    """What the benchmark prints: the loads, the latency table, the placement of each compute-unit setting."""
    return "\n".join([format_loads(doc["loads"]), format_latency(doc["latency"]),
                      *(format_placement(units, summary) for units, summary in doc["placement"].items())])


# ----------------------------------------------------------------------------- Core ML (macOS)


def measure_latency(runner: PackageRunner, length: int, warmup: int, runs: int) -> dict:
    inputs = package_inputs([[0] * length], length, 0)          # one text filling the length: the full workload
    for _ in range(warmup):
        runner.predict(inputs)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        runner.predict(inputs)
        times.append(time.perf_counter() - start)
    return latency_stats(times)


def measure_loads(package, units: str, function: str | None) -> tuple[dict, PackageRunner]:
    """First load (no cache: compile, then load) and cached load (filled first if needed); the cached runner."""
    first = PackageRunner(package, "coreml", function=function, compute_units=units, use_cache=False)
    first_s = first.load_report["load_s"]
    del first
    PackageRunner(package, "coreml", function=function, compute_units=units)   # fills the cache when empty
    cached = PackageRunner(package, "coreml", function=function, compute_units=units)
    return {"first_load_s": first_s, "cached_load_s": cached.load_report["load_s"],
            "compiled_path": cached.load_report["compiled_path"]}, cached


def flop_counts(package, meta: dict, lengths: list[int]) -> dict[int, int]:
    """length -> FLOPs: the metadata's counts, the rest counted now (coreml/cost.py) on the function that runs
    each length (meta["length_functions"], Package.metadata)."""
    stored = meta.get("cost") or {}
    counts = {n: stored[str(n)]["flops"] for n in lengths if str(n) in stored}
    if len(counts) < len(lengths):
        from modernbert_ane.coreml.cost import package_costs
        for n in [n for n in lengths if n not in counts]:
            counts.update({n: s["flops"] for n, s in package_costs(package, meta["length_functions"][n], [n]).items()})
    return counts


def main(argv) -> int:
    args = build_parser().parse_args(argv)
    if sys.platform != "darwin":
        raise UserError("bench_device.py needs macOS (Core ML runs only there); on this OS, convert.py's readiness "
                        "summary and coreml/cost.py give the FLOP and byte counts")
    if args.runs < 1 or args.warmup < 0:
        raise UserError("--runs must be at least 1 and --warmup at least 0")
    from modernbert_ane.cli import check_output_path, write_json
    check_output_path(args.json, args.force, inside=[args.package])
    package = Package(args.package)
    meta = package.metadata(args.function)
    available = package.lengths(meta["function"])
    lengths = args.seq_len or available
    unknown = [n for n in lengths if n not in available]
    if unknown:
        raise UserError(f"{args.package} has no length {unknown[0]} (it has {', '.join(map(str, available))})")
    flops = flop_counts(package, meta, lengths)
    placed = meta["length_functions"][max(lengths)]          # the function whose placement is read
    doc = {"package": str(args.package), "function": meta["function"], "lengths": lengths, "flops": flops,
           "loads": {}, "latency": [], "placement": {}}
    for units in args.compute_units:
        print(f"{units}: loading ...", file=sys.stderr)
        doc["loads"][units], runner = measure_loads(package, units, meta["function"])
        for n in lengths:
            stats = measure_latency(runner, n, args.warmup, args.runs)
            doc["latency"].append({"compute_units": units, "length": n, **stats,
                                   "tflops": tflops(flops[n], stats["median_ms"])})
        if not args.no_placement:
            try:
                records = compute_plan_records(doc["loads"][units]["compiled_path"], units, placed)
            except ValueError as e:                    # coremltools: "MLComputePlan is not supported" before 14.4
                print(f"{units}: no op placement ({e}; MLComputePlan needs macOS 14.4+)", file=sys.stderr)
                continue
            doc["placement"][units] = placement_summary(records, per_op_flops(package, placed, max(lengths)))
    print(format_results(doc))
    if args.json:
        write_json(args.json, doc)
    return 0


if __name__ == "__main__":
    run_cli(main)
