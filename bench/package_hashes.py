"""The bytes of converted packages, for checking that a refactoring changed none of them.

    python bench/package_hashes.py --work DIR [--json hashes.json]

Builds a fixed set of test checkpoints (tests/checkpoints.py: plain, planted outliers, classifier,
sentence-transformers; the trained reference) in DIR/checkpoints (kept, so a second run, e.g. on another
commit, converts the very same files), converts each with a few option sets through `python convert.py`
(--skip-check) and prints one sha256 per package over every file in it (path and content). Run it before and
after a change: equal lines mean byte-identical packages.
"""
import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

# (name, builder arguments, convert options)
CASES = [
    ("tiny-auto", dict(config="tiny", task="fill-mask"), ["--seq-len", "32", "64"]),
    ("tiny-outliers-hadamard", dict(config="tiny", task="fill-mask", outliers=True), ["--rotation", "hadamard"]),
    ("tiny-outliers-int8", dict(config="tiny", task="fill-mask", outliers=True), ["--compress", "int8"]),
    ("biased-classify-packed", dict(config="biased", task="classify"), ["--max-texts", "3"]),
    ("tiny-multi-task", dict(config="tiny", task="fill-mask"), ["--task", "fill-mask", "encoder"]),
    ("sentence-transformers", dict(sentence_transformers=True), []),
    ("reference-fill-mask", dict(reference="fill-mask"), ["--seq-len", "128"]),
]


def build(folder: Path, spec: dict) -> None:
    from checkpoints import build_checkpoint, build_reference, build_sentence_transformers
    if spec.get("sentence_transformers"):
        build_sentence_transformers(folder, "tiny", "mean", 32, True)
    elif "reference" in spec:
        build_reference(folder, spec["reference"], spec.get("outliers", False))
    else:
        build_checkpoint(folder, **spec)


def package_hash(package: Path) -> str:
    h = hashlib.sha256()
    for file in sorted(p for p in package.rglob("*") if p.is_file()):
        h.update(str(file.relative_to(package)).encode() + b"\0" + file.read_bytes())
    return h.hexdigest()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, help="folder for the checkpoints (kept) and packages (replaced)")
    p.add_argument("--json", help="also write {name: sha256} here")
    args = p.parse_args()
    work = Path(args.work).resolve()
    hashes = {}
    (work / "packages").mkdir(parents=True, exist_ok=True)
    for name, spec, options in CASES:
        folder = work / "checkpoints" / json.dumps(spec, sort_keys=True).translate(str.maketrans("{}\": ,", "______"))
        if not folder.exists():
            build(folder, spec)
        package = work / "packages" / f"{name}.mlpackage"
        cmd = [sys.executable, str(ROOT / "convert.py"), str(folder), "-o", str(package), "--force", "--skip-check",
               *options]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if done.returncode:
            sys.exit(f"convert.py failed for {name}: {done.stderr.strip().splitlines()[-1]}")
        hashes[name] = package_hash(package)
        print(f"{hashes[name]}  {name}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(hashes, indent=2) + "\n")


if __name__ == "__main__":
    main()
