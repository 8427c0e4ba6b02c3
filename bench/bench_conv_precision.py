"""Benchmark: how model.py's float16 forward should multiply, side by side on the trained reference model.

    python bench/bench_conv_precision.py [--seq-len 128] [--threads 1] [--work DIR]

model.py runs in float16 to measure float16 strategies (`convert.py --rotation auto`, `diff_torch.py --precision
float16`). Its convs (every linear, the 50k-row decoder included) can multiply two ways: torch's float16 product,
or a float32 product rounded once to float16 (model.Conv, what the emulator does for Core ML's conv). The bench
converts the bundled reference (fill-mask, `--rotation none --norm safe`, one length) and, for each way, times
model.py in float16 on the 9 evaluation texts and compares its logits with the package's on the emulator (the
closer, the better the float16 measurement predicts the package).
"""
import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]


def torch_float16_forward(self, x):
    """nn.Conv2d's own forward: torch's float16 product when the weights and x are float16."""
    return self._conv_forward(x, self.weight, self.bias)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="torch threads (timings; default 1)")
    p.add_argument("--work", help="folder for the package (default: a temporary one)")
    args = p.parse_args()
    import torch
    from modernbert_ane import model as model_module
    from modernbert_ane.api import convert
    from modernbert_ane.checkpoint import load_tokenizer, resolve_checkpoint
    from modernbert_ane.coreml.runner import PackageRunner
    from modernbert_ane.evaluation import EVAL_TEXTS, tokenize
    torch.set_num_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp())
    ckpt = resolve_checkpoint(str(ROOT / "tests" / "data" / "reference"))
    package = work / f"reference-none-safe-{args.seq_len}.mlpackage"
    if not package.exists():
        convert(ckpt.source, package, rotation="none", norm="safe", seq_len=[args.seq_len], skip_check=True)
    ids, mask = tokenize(load_tokenizer(ckpt.root), EVAL_TEXTS, args.seq_len, fixed_length=True)
    runner = PackageRunner(package, "emulate")
    emulated = np.stack([runner.predict({"input_ids": ids[i:i + 1].numpy(),
                                         "attention_mask": mask[i:i + 1].numpy()})["logits"][0]
                         for i in range(len(EVAL_TEXTS))])
    model = model_module.ModernBert.from_checkpoint(ckpt, "fill-mask")
    model.set_norm("safe")
    half, valid = copy.deepcopy(model).half(), mask.numpy() > 0
    print(f"model.py in float16 vs the package on the emulator, {len(EVAL_TEXTS)} texts at {args.seq_len} tokens "
          f"({int(valid.sum())} real), {args.threads} thread(s)")
    print("| conv product | time | max abs logit difference | mean abs difference | logits equal |")
    print("|---|---|---|---|---|")
    own = model_module.Conv.forward
    for name, forward in (("torch float16", torch_float16_forward), ("float32, rounded once (model.Conv)", own)):
        model_module.Conv.forward = forward
        start = time.perf_counter()
        with torch.no_grad():
            out = half(ids, mask).float().numpy()
        seconds = time.perf_counter() - start
        diff = np.abs(out - emulated)[valid]
        print(f"| {name} | {seconds:.1f} s | {diff.max():.4g} | {diff.mean():.3g} | "
              f"{np.mean(out[valid] == emulated[valid]):.3f} |")
    model_module.Conv.forward = own


if __name__ == "__main__":
    main()
