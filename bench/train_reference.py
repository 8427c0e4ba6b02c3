"""Pre-train the bundled reference ModernBERT: a small masked LM trained from scratch on this machine.

    python bench/train_reference.py                      # ~35 min on 2 CPU cores -> tests/data/reference/
    python bench/train_reference.py --steps 20 --out /tmp/ref --force   # a quick smoke run

transformers' own `ModernBertForMaskedLM`, the released ModernBERT byte-level BPE tokenizer
(tests/data/modernbert-tokenizer, Apache-2.0), and a corpus every machine with this project's
requirements has offline: the source of the Python standard library (code, docstrings, comments),
read in sorted order. Files whose path hashes to 0 mod 40 are held out for evaluation.

Deterministic for a seed, a corpus and a thread count (`--threads`; float sums on CPU depend on how
they are split): the data order and every mask are drawn from generators seeded by (seed, step),
so a run stopped and resumed (`--work`, state saved every `--save-every` steps) gives the same
weights as one that was not. A visible GPU is used with `--device cuda`; the committed model is the
CPU one.
"""
import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import sysconfig
import time
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "tests" / "data" / "modernbert-tokenizer"
DEFAULT_OUT = ROOT / "tests" / "data" / "reference"
HELD_OUT_MOD = 40          # a file is held out when crc32(its relative path) % 40 == 0

# 6 layers (global at 0 and 3, sliding windows of 64 tokens elsewhere), width 192 = 12 * 16 (a Paley x
# Sylvester Hadamard exists), 3 heads of 64. With the 50,368-row vocabulary it is 25 MB in float16.
MODEL_CONFIG = dict(hidden_size=192, intermediate_size=384, num_hidden_layers=6, num_attention_heads=3,
                    global_attn_every_n_layers=3, local_attention=64, max_position_embeddings=1024,
                    vocab_size=50368, pad_token_id=50283, cls_token_id=50281, sep_token_id=50282,
                    bos_token_id=50281, eos_token_id=50282, classifier_pooling="mean",
                    embedding_dropout=0.0, attention_dropout=0.0, mlp_dropout=0.0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="checkpoint folder to write")
    p.add_argument("--work", type=Path, default=ROOT / "out" / "train-reference",
                   help="training state (resumed from when present)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--mask-rate", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--device", default="cpu")
    p.add_argument("--corpus-files", type=int, default=None, metavar="N",
                   help="train on the first N files only (tests; the committed model uses all)")
    p.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                   help="save the training state after STEP and stop (run again to resume)")
    p.add_argument("--held-out-sequences", type=int, default=256, help="evaluated after training")
    p.add_argument("--force", action="store_true", help="replace --out")
    return p.parse_args(argv)


def corpus_files() -> list[tuple[str, Path]]:
    """(relative path, path) of every .py file of the standard library, sorted; site-packages excluded."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib).as_posix()
        if "site-packages" in rel or not path.is_file():
            continue
        files.append((rel, path))
    return files


def is_held_out(rel: str) -> bool:
    return zlib.crc32(rel.encode()) % HELD_OUT_MOD == 0


def load_tokenizer():
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast.from_pretrained(str(TOKENIZER))


def token_stream(tokenizer, files, held_out: bool) -> tuple[torch.Tensor, str]:
    """All chosen files tokenized (no special tokens) and joined by [SEP]; and the corpus' sha256."""
    digest = hashlib.sha256()
    texts = []
    for rel, path in files:
        if is_held_out(rel) != held_out:
            continue
        text = path.read_bytes().decode("utf-8", errors="replace")
        digest.update(rel.encode() + b"\0" + text.encode())
        texts.append(text)
    ids = []
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(tokenizer.sep_token_id)
    return torch.tensor(ids, dtype=torch.int64), digest.hexdigest()


def chunk(stream: torch.Tensor, seq_len: int, cls_id: int, sep_id: int) -> torch.Tensor:
    """(N, seq_len) sequences [CLS] x[0:seq_len-2] [SEP], cut back to back from the stream."""
    body = seq_len - 2
    n = len(stream) // body
    rows = stream[: n * body].view(n, body)
    return torch.cat([torch.full((n, 1), cls_id), rows, torch.full((n, 1), sep_id)], dim=1)


def mask_batch(ids: torch.Tensor, rate: float, tokenizer, generator, special: torch.Tensor, random_ok=True):
    """BERT masking: `rate` of the ordinary tokens are predicted; of those 80 % become [MASK], 10 % a random
    token and 10 % stay (only [MASK] with random_ok=False). Labels are -100 elsewhere."""
    chosen = (torch.rand(ids.shape, generator=generator) < rate) & ~torch.isin(ids, special)
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    inputs = ids.clone()
    draw = torch.rand(ids.shape, generator=generator)
    to_mask = chosen & (draw < 0.8) if random_ok else chosen
    inputs[to_mask] = tokenizer.mask_token_id
    if random_ok:
        to_random = chosen & (draw >= 0.8) & (draw < 0.9)
        random_ids = torch.randint(0, tokenizer.vocab_size - 88, ids.shape, generator=generator)  # no added tokens
        inputs[to_random] = random_ids[to_random]
    return inputs, labels


def build_model(seed: int):
    from transformers import ModernBertConfig, ModernBertForMaskedLM
    torch.manual_seed(seed)
    config = ModernBertConfig(**MODEL_CONFIG, sparse_prediction=True)
    return ModernBertForMaskedLM(config)


def learning_rate(step: int, total: int, peak: float) -> float:
    warmup = max(1, total // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


@torch.no_grad()
def masked_accuracy(model, sequences: torch.Tensor, tokenizer, special, seed: int, batch: int = 16,
                    rate: float = 0.15) -> dict:
    """top-1 / top-5 accuracy on masked tokens (every chosen token replaced by [MASK]), deterministic."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    hits1 = hits5 = total = 0
    for i in range(0, len(sequences), batch):
        ids = sequences[i:i + batch]
        inputs, labels = mask_batch(ids, rate, tokenizer, g, special, random_ok=False)
        logits = model(input_ids=inputs, attention_mask=torch.ones_like(inputs)).logits
        where = labels != -100
        if logits.shape[:2] == ids.shape:
            logits = logits[where]                      # dense prediction (eval mode may skip sparsity)
        top5 = logits.topk(5, dim=-1).indices
        target = labels[where]
        hits1 += (top5[:, 0] == target).sum().item()
        hits5 += (top5 == target[:, None]).any(-1).sum().item()
        total += len(target)
    model.train()
    return {"top1": hits1 / total, "top5": hits5 / total, "tokens": total}


def unigram_baseline(train: torch.Tensor, sequences: torch.Tensor, tokenizer, special, seed: int,
                     batch: int = 16, rate: float = 0.15) -> dict:
    """Always guess the training corpus' most frequent tokens, on the same masked positions."""
    counts = torch.bincount(train, minlength=tokenizer.vocab_size + 200)
    counts[special] = 0
    top5 = counts.topk(5).indices
    g = torch.Generator().manual_seed(seed)
    hits1 = hits5 = total = 0
    for i in range(0, len(sequences), batch):
        _, labels = mask_batch(sequences[i:i + batch], rate, tokenizer, g, special, random_ok=False)
        target = labels[labels != -100]
        hits1 += (target == top5[0]).sum().item()
        hits5 += torch.isin(target, top5).sum().item()
        total += len(target)
    return {"top1": hits1 / total, "top5": hits5 / total, "tokens": total}


def save_state(work: Path, model, optimizer, step: int, meta: dict) -> None:
    work.mkdir(parents=True, exist_ok=True)
    tmp = work / "state.pt.tmp"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "meta": meta}, tmp)
    os.replace(tmp, work / "state.pt")


def train(args) -> None:
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    tokenizer = load_tokenizer()
    special = torch.tensor(tokenizer.all_special_ids)
    files = corpus_files()[:args.corpus_files]
    t0 = time.time()
    train_stream, corpus_hash = token_stream(tokenizer, files, held_out=False)
    held_stream, _ = token_stream(tokenizer, files, held_out=True)
    sequences = chunk(train_stream, args.seq_len, tokenizer.cls_token_id, tokenizer.sep_token_id)
    held = chunk(held_stream, args.seq_len, tokenizer.cls_token_id, tokenizer.sep_token_id)[:args.held_out_sequences]
    print(f"corpus: {len(files)} files of {sysconfig.get_paths()['stdlib']}, {len(train_stream):,} training "
          f"tokens ({len(sequences):,} sequences of {args.seq_len}), {len(held_stream):,} held out; "
          f"sha256 {corpus_hash[:16]}; tokenized in {time.time() - t0:.0f} s", flush=True)

    meta = {k: getattr(args, k) for k in ("steps", "batch_size", "seq_len", "lr", "mask_rate", "seed", "threads")}
    meta["corpus_sha256"] = corpus_hash
    meta["torch"] = str(torch.__version__)            # a TorchVersion would not load with weights_only
    model = build_model(args.seed).to(args.device)
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    start = 0
    state_file = args.work / "state.pt"
    if state_file.exists():
        state = torch.load(state_file, weights_only=True)
        if state["meta"] != meta:
            fail(f"{state_file} was saved with other options or another corpus; remove it or use --work")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
        print(f"resumed from {state_file} at step {start}", flush=True)

    model.train()
    tokens_per_step = args.batch_size * args.seq_len
    t_start, losses = time.time(), []
    for step in range(start, args.steps):
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        rows = torch.randint(0, len(sequences), (args.batch_size,), generator=g)
        inputs, labels = mask_batch(sequences[rows], args.mask_rate, tokenizer, g, special)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr)
        out = model(input_ids=inputs.to(args.device), attention_mask=torch.ones_like(inputs).to(args.device),
                    labels=labels.to(args.device))
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(out.loss.item())
        done = step + 1
        if done % 10 == 0 or done == args.steps:
            rate = (done - start) * tokens_per_step / (time.time() - t_start)
            eta = (args.steps - done) * tokens_per_step / rate
            print(f"step {done}/{args.steps}  loss {sum(losses[-10:]) / len(losses[-10:]):.3f}  "
                  f"{rate:,.0f} tokens/s  lr {learning_rate(step, args.steps, args.lr):.2e}  "
                  f"ETA {eta / 60:.1f} min", flush=True)
        if (done % args.save_every == 0 or done == args.stop_after) and done < args.steps:
            save_state(args.work, model, optimizer, done, meta)
        if done == args.stop_after:
            print(f"stopped after step {done}; the state is in {args.work}", flush=True)
            return

    model = model.cpu()
    if not len(held):
        fail("no held-out text in the chosen corpus files; use more --corpus-files")
    quality = {"held_out": masked_accuracy(model, held, tokenizer, special, seed=args.seed),
               "unigram": unigram_baseline(train_stream, held, tokenizer, special, seed=args.seed)}
    print(f"held-out masked tokens ({quality['held_out']['tokens']}): top-1 {quality['held_out']['top1']:.3f} "
          f"top-5 {quality['held_out']['top5']:.3f}; unigram baseline top-1 {quality['unigram']['top1']:.3f} "
          f"top-5 {quality['unigram']['top5']:.3f}", flush=True)
    save_reference(model, args.out, {**meta, "quality": quality}, args.force)


def save_reference(model, out: Path, meta: dict, force: bool) -> None:
    """The checkpoint in float16 (what a released checkpoint would carry), its tokenizer and how it was made."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.config.sparse_prediction = False              # a released checkpoint predicts every position
    model.half().save_pretrained(tmp)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "NOTICE"):
        shutil.copyfile(TOKENIZER / name, tmp / name)                 # unchanged, as released
    (tmp / "training.json").write_text(json.dumps(meta, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    print(f"wrote {out}", flush=True)


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv=None):
    args = parse_args(argv)
    if args.out.exists() and not args.force:
        fail(f"{args.out} exists; pass --force to replace it")
    train(args)


if __name__ == "__main__":
    main()
