"""Fidelity of converted packages on the float16 emulator, for the test configurations.

    python bench/bench_fidelity.py [--work DIR]

Builds each checkpoint of tests/checkpoints.py (the small random ones the tests use, and the bundled
trained reference with its fine-tuned heads, with and without planted outliers), converts it with
convert.py's defaults and runs diff_coreml.py on the emulator against float32 transformers, in the
default and the pessimistic mode. Prints a Markdown table for the README.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

# (label, builder arguments, convert options)
CASES = [
    ("tiny fill-mask (head_dim 16, global every 3rd)", dict(config="tiny", task="fill-mask"), []),
    ("biased fill-mask (all biases, head_dim 32)", dict(config="biased", task="fill-mask"), []),
    ("odd fill-mask (hidden 48, tanh GELU)", dict(config="odd", task="fill-mask"), []),
    ("tiny fill-mask, planted 3e4 outliers", dict(config="tiny", task="fill-mask", outliers=True), []),
    ("tiny fill-mask, planted outliers, int8", dict(config="tiny", task="fill-mask", outliers=True),
     ["--compress", "int8"]),
    ("biased classify", dict(config="biased", task="classify"), []),
    ("biased token-classify", dict(config="biased", task="token-classify"), []),
    ("tiny encoder", dict(config="tiny", task="encoder"), []),
    ("sentence-transformers (mean, Dense, Normalize)", dict(sentence_transformers=True), []),
    ("trained reference fill-mask", dict(reference="fill-mask"), []),
    ("trained reference, embedding-norm outliers", dict(reference="fill-mask", outliers="embedding"), []),
    ("trained reference, MLP outliers", dict(reference="fill-mask", outliers="mlp"), []),
    ("trained reference, MLP outliers, int8", dict(reference="fill-mask", outliers="mlp"), ["--compress", "int8"]),
    ("trained line classifier (mean pooling)", dict(reference="classify"), []),
    ("trained line classifier, MLP outliers", dict(reference="classify", outliers="mlp"), []),
    ("trained token classifier", dict(reference="token-classify"), []),
    ("trained sentence-transformers (mean, Normalize)", dict(reference="embed"), []),
]


def run(args: list[str]) -> None:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if result.returncode:
        sys.exit(f"failed: {' '.join(args)}\n{result.stderr[-2000:]}")


def main() -> None:
    from checkpoints import build_checkpoint, build_reference, build_sentence_transformers
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", help="folder for checkpoints and packages (default: a temporary one)")
    p.add_argument("--only", help="run the configurations whose label contains this text")
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="fidelity-"))
    rows = ["| configuration | lengths | float16 strategy | top-1 | kl_mean | cosine_min | pessimistic: top-1 | kl_mean | "
            "cosine_min | nonfinite |", "|---|---|---|---|---|---|---|---|---|---|"]
    for i, (label, build, options) in enumerate(CASES):
        if args.only and args.only not in label:
            continue
        folder, package = work / f"ckpt{i}", work / f"pkg{i}.mlpackage"
        print(f"{label} ...", file=sys.stderr)
        build = dict(build)
        if build.pop("sentence_transformers", False):
            build_sentence_transformers(folder)
        elif "reference" in build:
            build_reference(folder, build.pop("reference"), **build)
        else:
            build_checkpoint(folder, **build)
        task = ["--task", "embed"] if "sentence-transformers" in label else []
        run(["convert.py", str(folder), "--seq-len", "128", "512", "-o", str(package), "--force", *task, *options])
        cells = []
        for mode, extra in (("m", []), ("p", ["--pessimistic"])):
            report = work / f"{mode}{i}.json"
            run(["diff_coreml.py", str(package), "--json", str(report), "--force", "--backend", "emulate", *extra])
            m = json.loads(report.read_text())
            fmt = lambda k, f: format(m[k], f) if k in m else "–"  # noqa: E731
            cells += [fmt("top1_agreement", ".3f"), fmt("kl_mean", ".1e"), fmt("cosine_min", ".5f")]
        meta = package_rotation(package)
        rows.append(f"| {label} | 128, 512 | {meta} | {' | '.join(cells)} | {m['nonfinite']} |")
        print(rows[-1], file=sys.stderr)
    print("\n".join(rows))


def package_rotation(package: Path) -> str:
    """The float16 strategy the package was converted with (convert.py records it in the metadata)."""
    from modernbert_ane.coreml.package import Package
    meta = Package(package).metadata()
    return f"{meta.get('rotation', '?')} + {meta.get('norm') or 'fused'} norm"


if __name__ == "__main__":
    main()
