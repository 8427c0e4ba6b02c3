"""Where Core ML places a package's ops: compute-plan records (coreml/macos.py's compute_plan_records, or a
file of them) summed with the FLOPs of each op (coreml/cost.py) into shares on the Neural Engine and the ops
placed elsewhere. Runs on any OS.
"""
from modernbert_ane.coreml.cost import Program, op_costs

NEURAL_ENGINE = "neural_engine"


def placement_summary(records: list[dict], op_flops: dict[str, int]) -> dict:
    """Aggregate compute-plan records (macos.compute_plan_records) with per-op FLOPs (first output name ->
    FLOPs, cost.op_costs): the share of ops and of FLOPs on the Neural Engine, ops per device, and
    every op placed elsewhere grouped by type (count, FLOPs, devices, up to 3 op names)."""
    devices, fallbacks = {}, {}
    total_flops = sum(op_flops.get(r["name"], 0) for r in records)
    ne_ops = ne_flops = 0
    for r in records:
        device, flops = r["device"] or "unknown", op_flops.get(r["name"], 0)
        devices[device] = devices.get(device, 0) + 1
        if device == NEURAL_ENGINE:
            ne_ops, ne_flops = ne_ops + 1, ne_flops + flops
            continue
        group = fallbacks.setdefault(r["op_type"], {"count": 0, "flops": 0, "devices": {}, "examples": []})
        group["count"] += 1
        group["flops"] += flops
        group["devices"][device] = group["devices"].get(device, 0) + 1
        if len(group["examples"]) < 3:
            group["examples"].append(r["name"])
    return {"ops": len(records), "ops_by_device": dict(sorted(devices.items())),
            "neural_engine_op_share": ne_ops / len(records) if records else None,
            "neural_engine_flop_share": ne_flops / total_flops if total_flops else None,
            "fallbacks": dict(sorted(fallbacks.items(), key=lambda kv: (-kv[1]["count"], kv[0])))}


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def format_placement(units: str, summary: dict) -> str:
    """The placement summary in words: shares, then each fallback type."""
    devices = ", ".join(f"{d} {n}" for d, n in summary["ops_by_device"].items())
    lines = [f"{units}: {summary['ops']} ops ({devices}); on the Neural Engine: "
             f"{_pct(summary['neural_engine_op_share'])} of ops, {_pct(summary['neural_engine_flop_share'])} of FLOPs"]
    if not summary["fallbacks"]:
        lines.append("  every op on the Neural Engine")
    for op_type, g in summary["fallbacks"].items():
        where = ", ".join(f"{d} {n}" for d, n in sorted(g["devices"].items()))
        lines.append(f"  off the Neural Engine: {op_type} x{g['count']} ({where}; {g['flops'] / 1e9:.3g} GFLOP), "
                     f"e.g. {', '.join(g['examples'])}")
    return "\n".join(lines)


def per_op_flops(package, function: str | None, length: int) -> dict[str, int]:
    """op name (its first output, as in compute-plan records) -> FLOPs (coreml/cost.py), one function at `length`."""
    program = Program(package, function)
    return {c.name: c.flops for c in op_costs(program, length)}
