"""What the accuracy reports share: the evaluation texts, the transformers reference, the metrics,
and the tables. Used by diff_torch.py and diff_coreml.py (and, for texts, by the tests)."""
import sys

import numpy as np
import torch

from modernbert_ane.checkpoint import Checkpoint, CheckpointError, check_finite, check_weight_files, sentence_modules
from modernbert_ane.tasks import COSINE_TASKS, POOLED_TASKS, SPECS
from modernbert_ane.user_errors import UserError

# Short sentences and passages longer than the 128-token local window of the released checkpoints,
# so both the global and the sliding-window layers, and padding in a batch, are exercised.
EVAL_TEXTS = [
    "The capital of France is [MASK].",
    "Paris is the capital and largest city of France.",
    "She poured the coffee, opened the window and sat down to read the morning paper.",
    "A neural network learns its weights from data by gradient descent.",
    "The meeting was moved to Thursday because half of the team was travelling.",
    "Water boils at one hundred degrees Celsius at sea level.",
    ("The river rises in the hills north of the town and runs south through farmland for most of its length. "
     "In the spring the snow melts quickly and the water climbs over its banks, flooding the low fields beside "
     "the old mill. Farmers learned long ago to plant late in those fields, after the water has gone down, and "
     "to keep their animals on the higher ground until the end of April. The mill itself was built more than "
     "two hundred years ago and ground wheat and barley for the villages around it until the railway arrived. "
     "After that, grain was sent by train to the large mills in the city, and the wheel stopped turning. "
     "Today the building is a small museum, and on Sundays volunteers open the sluice gate so that visitors can "
     "watch the wheel move again. Children are allowed to pour a handful of grain into the hopper and see it "
     "come out as flour, which they take home in paper bags printed with a drawing of the mill. The museum also "
     "keeps the account books of the last miller, who wrote down every sack that passed through his hands, the "
     "name of the farmer who brought it and the price he was paid, in a neat hand that is still easy to read."),
    ("Modern computers store numbers in a fixed number of bits, and every format trades range against "
     "precision. A sixteen bit floating point number has five bits of exponent and ten bits of fraction, so it "
     "can represent values up to about sixty five thousand with roughly three decimal digits of precision. That "
     "is enough for many of the values a neural network computes, such as the output of a normalisation layer "
     "or the probabilities of a softmax, but it is not enough for every intermediate result. When a model "
     "produces a few very large activations, squaring them to compute a variance overflows the format and the "
     "result becomes infinite. Small updates added to a large value are also lost, because the spacing between "
     "neighbouring representable numbers grows with their size. Engineers who move models to such hardware "
     "therefore study where large values appear, rewrite the operations that are sensitive to them, and check "
     "the converted model against the original on real text before they ship it. A careful comparison reports "
     "how far the predicted distributions moved, how often the most likely token changed, and which layer "
     "first produced a value that the format could not hold."),
    ("The library opened at nine, but the queue began to form long before that. Students with laptops under "
     "their arms, retired teachers with shopping bags full of returned novels, and a few tourists who had read "
     "about the painted ceiling waited on the steps in the cold. When the doors finally opened, everyone went "
     "in different directions: the students to the quiet reading room on the second floor, the teachers to the "
     "returns desk, and the tourists straight to the centre of the main hall, where they tipped their heads "
     "back and looked up at the ceiling for a long time without saying anything. The painting shows the four "
     "seasons as four women walking around the edge of a garden, each carrying something different: flowers, "
     "a sheaf of wheat, a basket of apples and a lantern. The artist worked on it for three years, lying on his "
     "back on a wooden platform, and according to the guide he fell off twice."),
]


def tokenize(tokenizer, texts: list[str], max_length: int, fixed_length: bool = False):
    """(input_ids, attention_mask), int64 (B, S): truncated to max_length, padded to the longest text or,
    with `fixed_length` (a package's fixed input shape), to max_length."""
    enc = tokenizer(list(texts), padding="max_length" if fixed_length else "longest", truncation=True,
                    max_length=max_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def reference_model(ckpt: Checkpoint, task: str):
    """transformers' own ModernBERT for the same checkpoint and task, float32, eager attention."""
    import transformers
    transformers.utils.logging.disable_progress_bar()
    cls = getattr(transformers, SPECS[task].hf_class)
    check_weight_files(ckpt.path, ckpt.allow_pickle)            # pickles only when allowed; truncated files
    transformers.utils.logging.set_verbosity_error()            # its load report: we say what is wrong
    try:
        model, info = cls.from_pretrained(str(ckpt.path), attn_implementation="eager", dtype=torch.float32,
                                          output_loading_info=True, ignore_mismatched_sizes=True)
    except Exception as e:
        raise CheckpointError(f"transformers cannot load {ckpt.path} as {SPECS[task].hf_class}: {e}") from e
    check_finite(model.state_dict(), ckpt.path)                 # NaN or inf weights: refused with their name
    missing = sorted(info.get("missing_keys") or [])            # transformers would fill them with random values
    mismatched = sorted(f"{k[0]} {tuple(k[1])} (expected {tuple(k[2])})" if isinstance(k, tuple) else str(k)
                        for k in info.get("mismatched_keys") or [])
    if missing or mismatched:
        raise CheckpointError(f"weights in {ckpt.path} do not match {SPECS[task].hf_class}: "
                              + "; ".join(([f"missing {', '.join(missing[:5])}"] if missing else []) +
                                          ([f"shape of {', '.join(mismatched[:5])}"] if mismatched else [])))
    return model.eval()


def sentence_embeddings(ckpt: Checkpoint, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' semantics on transformers' last hidden state (B, S, C) -> (B, D): the
    folder's Pooling (cls or masked mean), Dense layers (activation(linear)) and Normalize, as
    sentence_transformers.models computes them; a plain checkpoint pools by its classifier_pooling."""
    modules = sentence_modules(ckpt)
    if modules.pooling == "cls":
        x = hidden[:, 0]
    else:
        m = attention_mask.to(hidden.dtype).unsqueeze(-1)
        x = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    for weight, bias, act in modules.dense:                    # torch.nn's own activation of that name
        x = getattr(torch.nn, act)()(torch.nn.functional.linear(x, weight, bias))
    return torch.nn.functional.normalize(x, p=2, dim=1) if modules.normalize else x


def reference_outputs(ref, task: str, input_ids, attention_mask, ckpt: Checkpoint | None = None) -> dict:
    """The reference's task output and its intermediates, all as float32 (B, S, C) arrays:
    'embeddings', 'layers.i', 'encoder' (final norm output), 'output' (the task output; (B, L) or (B, D)
    for pooled tasks). `ckpt` is needed for embed (its sentence-transformers modules)."""
    base = ref if task in ("encoder", "embed") else ref.model
    captured = {}
    hooks = [base.embeddings.register_forward_hook(lambda m, i, o: captured.__setitem__("embeddings", o)),
             base.final_norm.register_forward_hook(lambda m, i, o: captured.__setitem__("encoder", o))]
    for idx, layer in enumerate(base.layers):
        hooks.append(layer.register_forward_hook(
            lambda m, i, o, idx=idx: captured.__setitem__(f"layers.{idx}", o[0] if isinstance(o, tuple) else o)))
    try:
        with torch.no_grad():
            out = ref(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        for h in hooks:
            h.remove()
    if task == "embed":
        with torch.no_grad():
            captured["output"] = sentence_embeddings(ckpt, out.last_hidden_state, attention_mask)
    else:
        captured["output"] = out.last_hidden_state if task == "encoder" else out.logits
    return {k: v.detach().float().numpy() for k, v in captured.items()}


# ----------------------------------------------------------------------------- metrics

MEASURES = ("kl", "cosine", "score")
ROW_CHUNK = 32                   # rows of outputs measured at a time: a 256k-vocabulary row is 2 MB in float64
SCORE_FLOOR = 1e-3               # relative score error divides by max(|reference score|, this): no 0/0 near zero


def output_measure(task: str, width: int) -> str:
    """How a task's output of `width` values per row is compared: "cosine" (encoder, embed), "score" (a one-label
    head: reranker, regression; its softmax is always 1, so KL is always 0) or "kl" (a distribution)."""
    if task in COSINE_TASKS:
        return "cosine"
    return "score" if width == 1 else "kl"


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_per_row(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(reference || ours) in nats of each row (N, V); inf for a row with a non-finite logit."""
    finite = np.isfinite(logits).all(axis=-1)
    lp_ref, lp = _log_softmax(ref_logits), _log_softmax(np.where(np.isfinite(logits), logits, 0.0))
    kl = (np.exp(lp_ref) * (lp_ref - lp)).sum(axis=-1)
    return np.where(finite, kl, np.inf)                        # a row with a non-finite logit is infinitely wrong


def cosine_per_row(ref: np.ndarray, ours: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row (N, C); non-finite values of ours count as 0."""
    ref, ours = ref.astype(np.float64), np.nan_to_num(ours.astype(np.float64), posinf=0.0, neginf=0.0)
    return (ref * ours).sum(-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(ours, axis=-1) + 1e-30)


def _top_k(x: np.ndarray, k: int) -> np.ndarray:
    """The indices of each row's k largest values (N, k), unordered; argpartition, not a full sort of V."""
    return np.argpartition(-x, k - 1, axis=-1)[:, :k] if x.shape[-1] > k else np.argsort(-x, axis=-1)


def _chunk_measures(measure: str, ref: np.ndarray, ours: np.ndarray) -> dict[str, np.ndarray]:
    diff = np.nan_to_num(np.abs(ours.astype(np.float64) - ref), nan=np.inf)        # (n, W)
    out = {"max_abs_diff": diff.max(-1), "nonfinite": (~np.isfinite(ours)).sum(-1)}
    if measure == "cosine":
        out["cosine"] = cosine_per_row(ref, ours)
    elif measure == "score":
        out["abs_error"] = diff[:, 0]
        out["rel_error"] = diff[:, 0] / np.maximum(np.abs(ref[:, 0]), SCORE_FLOOR)
        out["score_reference"], out["score"] = ref[:, 0].astype(np.float64), ours[:, 0].astype(np.float64)
    else:
        finite = np.isfinite(ours).all(axis=-1)
        k = min(5, ref.shape[-1])
        top_ref, top = _top_k(ref, k), _top_k(np.where(np.isfinite(ours), ours, -np.inf), k)
        overlap = np.array([len(set(a) & set(b)) / k for a, b in zip(top_ref, top)])
        top1 = ref.argmax(-1) == np.where(np.isfinite(ours), ours, -np.inf).argmax(-1)
        out.update(kl=kl_per_row(ref, ours), top1=(top1 & finite).astype(np.float64),
                   top5=np.where(finite, overlap, 0.0))
    return out


def row_measures(measure: str, ref: np.ndarray, ours: np.ndarray) -> dict[str, np.ndarray]:
    """Per row of (N, W) outputs, in chunks of ROW_CHUNK rows (a float64 copy of the whole would be GBs at a
    256k vocabulary): max_abs_diff, nonfinite, and kl/top1/top5, cosine, or abs_error/rel_error."""
    parts = [_chunk_measures(measure, ref[i:i + ROW_CHUNK], ours[i:i + ROW_CHUNK])
             for i in range(0, len(ref), ROW_CHUNK)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def row_error(measure: str, rows: dict[str, np.ndarray]) -> np.ndarray:
    """The one number per row that ranks rows and is plotted: KL, 1 - cosine or |score error| (inf: non-finite)."""
    error = {"kl": lambda: rows["kl"], "cosine": lambda: 1 - rows["cosine"], "score": lambda: rows["abs_error"]}
    error = error[measure]()
    return np.where(np.isnan(error) | (rows["nonfinite"] > 0), np.inf, error)


def summarize(measure: str, rows: dict[str, np.ndarray]) -> dict:
    """The metrics over rows measured by row_measures (the JSON keys; see README "Accuracy reports")."""
    out = {"max_abs_diff": float(rows["max_abs_diff"].max()), "nonfinite": int(rows["nonfinite"].sum())}
    if measure == "cosine":
        out.update(cosine_min=float(rows["cosine"].min()), cosine_mean=float(rows["cosine"].mean()))
    elif measure == "score":
        out.update(score_abs_error_max=float(rows["abs_error"].max()),
                   score_abs_error_mean=float(rows["abs_error"].mean()),
                   score_rel_error_max=float(rows["rel_error"].max()))
    else:
        out.update(kl_mean=float(rows["kl"].mean()), kl_max=float(rows["kl"].max()),
                   top1_agreement=float(rows["top1"].mean()), top5_agreement=float(rows["top5"].mean()))
    return out


def distribution_metrics(ref_logits: np.ndarray, logits: np.ndarray) -> dict:
    """KL(reference || ours) in nats per row, and top-1/top-5 agreement, over rows (N, V).
    top5_agreement is the mean overlap of the two top-5 sets (1.0: same five tokens)."""
    metrics = summarize("kl", row_measures("kl", ref_logits, logits))
    return {k: metrics[k] for k in ("kl_mean", "kl_max", "top1_agreement", "top5_agreement")}


def cosine_metrics(ref: np.ndarray, ours: np.ndarray) -> dict:
    """Cosine similarity per row (N, C)."""
    cos = cosine_per_row(ref, ours)
    return {"cosine_min": float(cos.min()), "cosine_mean": float(cos.mean())}


def output_metrics(task: str, ref: np.ndarray, ours: np.ndarray, attention_mask: np.ndarray) -> dict:
    """The final metrics for a task output, over non-padding tokens (or per text for pooled (B, L) outputs)."""
    if task in POOLED_TASKS:
        rows_ref, rows = ref, ours
    else:
        valid = attention_mask.astype(bool)
        rows_ref, rows = ref[valid], ours[valid]
    measure = output_measure(task, ref.shape[-1])
    return summarize(measure, row_measures(measure, rows_ref, rows))


# ----------------------------------------------------------------------------- per-token accounting

DELIMITER_PEAK_RATIO = 10.0      # trained ModernBERTs carry ~3e4 on a few tokens, ordinary ones far less
DELIMITER_RULE = (f"[CLS]/[SEP] (the tokenizer's cls and sep tokens) and any token whose peak |value| in the "
                  f"reference's residual stream exceeds {DELIMITER_PEAK_RATIO:g}x its text's median token peak")


def residual_peaks(ref: dict) -> np.ndarray:
    """Each token's largest |value| in reference_outputs' residual stream ('embeddings', 'layers.i'): (B, S)."""
    keys = [k for k in ref if k == "embeddings" or k.startswith("layers.")]
    return np.max([np.abs(ref[k]).max(-1) for k in keys], axis=0)


def delimiter_tokens(tokenizer, input_ids: np.ndarray, peaks: np.ndarray) -> np.ndarray:
    """DELIMITER_RULE on one text's non-padding tokens: ids and residual peaks (S,) -> bool (S,)."""
    special = np.isin(input_ids, [tokenizer.cls_token_id, tokenizer.sep_token_id])
    return special | (peaks > DELIMITER_PEAK_RATIO * np.median(peaks))


def valid_rows(x: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """The non-padding rows of one text (S, W): a view when they come first (no copy of 0.3 GB of logits)."""
    n = int(valid.sum())
    return x[:n] if valid[:n].all() else x[valid]


class TokenRecords:
    """Measures per token (or per text, for pooled outputs) gathered text by text, so that no output is kept:
    the summaries over all rows, over delimiter and ordinary tokens, per text, and the worst row."""

    def __init__(self, measure: str):
        assert measure in MEASURES, measure
        self.measure = measure
        self.parts: list[dict] = []                           # one per text

    def add(self, text: int, rows: dict[str, np.ndarray], tokens: list[str] | None = None,
            token_ids: np.ndarray | None = None, delimiter: np.ndarray | None = None) -> None:
        """One text's rows (row_measures; per token, or a single row for a pooled output); text counts from 1."""
        n = len(rows["max_abs_diff"])
        self.parts.append({"text": text, "rows": rows, "tokens": tokens, "token_ids": token_ids,
                           "delimiter": np.zeros(n, bool) if delimiter is None else np.asarray(delimiter, bool)})

    def _rows(self, parts=None) -> dict[str, np.ndarray]:
        parts = self.parts if parts is None else parts
        return {k: np.concatenate([p["rows"][k] for p in parts]) for k in parts[0]["rows"]}

    def metrics(self) -> dict:
        return summarize(self.measure, self._rows())

    def split(self) -> dict:
        """{"delimiter_tokens": ..., "ordinary_tokens": ...}: the summaries over each (with their token counts)."""
        rows, delimiter = self._rows(), np.concatenate([p["delimiter"] for p in self.parts])
        out = {}
        for key, where in (("delimiter_tokens", delimiter), ("ordinary_tokens", ~delimiter)):
            out[key] = {"tokens": int(where.sum()),
                        **(summarize(self.measure, {k: v[where] for k, v in rows.items()}) if where.any() else {})}
        return out

    def errors(self) -> list[np.ndarray]:
        """Per text, row_error of each row: for plots."""
        return [row_error(self.measure, p["rows"]) for p in self.parts]

    def describe(self, part: dict, i: int) -> dict:
        """One row as JSON: where it is (text, position, token) and its measures."""
        out = {"text": part["text"]}
        if part["tokens"] is not None:
            out.update(position=i, token=part["tokens"][i], token_id=int(part["token_ids"][i]),
                       delimiter=bool(part["delimiter"][i]))
        for k, v in part["rows"].items():
            value = v[i].item()
            out[{"top1": "top1_agrees", "top5": "top5_overlap"}.get(k, k)] = bool(value) if k == "top1" else value
        return out

    def worst(self, parts=None) -> dict:
        """The row with the largest row_error (a non-finite one first), described."""
        parts = self.parts if parts is None else parts
        errors = [row_error(self.measure, p["rows"]) for p in parts]
        j = max(range(len(parts)), key=lambda t: (errors[t].max(), -t))
        return self.describe(parts[j], int(np.argmax(errors[j])))

    def text_rows(self) -> list[dict]:
        """Per text: its row count, its summary and (per-token records) its worst token."""
        rows = []
        for p in self.parts:
            row = {"text": p["text"], "tokens": len(p["rows"]["max_abs_diff"]), **summarize(self.measure, p["rows"])}
            if p["tokens"] is not None:
                row["worst_token"] = {k: v for k, v in self.worst([p]).items() if k != "text"}
            rows.append(row)
        return rows

    def panels(self) -> list[dict]:
        """For report.write_report: per text its errors per row, tokens and delimiter marks."""
        return [{"values": e, "tokens": p["tokens"], "delimiter": p["delimiter"]}
                for p, e in zip(self.parts, self.errors())]


class Accounting:
    """What the diff scripts keep of each evaluation text, added one text at a time (no output is kept):
    `outputs` measures the task output per token (per text for pooled tasks), `tokens` per token with the
    delimiter split (the task output; for pooled tasks the encoder output, when the script has it), and
    `cls_rows` the encoder's [CLS] row of a cls-pooled task (when the script has it)."""

    def __init__(self, task: str, width: int, tokenizer, cls_pooled: bool = False):
        self.task, self.tokenizer, self.pooled = task, tokenizer, task in POOLED_TASKS
        self.measure = output_measure(task, width)
        self.outputs = TokenRecords(self.measure)
        self.tokens = TokenRecords("cosine") if self.pooled else self.outputs
        self.cls_rows = TokenRecords("cosine") if self.pooled and cls_pooled else None

    def add(self, text: int, input_ids, peaks, ref_output, output, ref_encoder=None, encoder=None) -> None:
        """One text (counting from 1), non-padding tokens only: input_ids and residual_peaks (S,); the task
        outputs (S, W), or (1, W) pooled; the encoder outputs (S, C) of a pooled task, if known."""
        input_ids = np.asarray(input_ids)
        tokens = self.tokenizer.convert_ids_to_tokens(input_ids.tolist())
        delimiter = delimiter_tokens(self.tokenizer, input_ids, np.asarray(peaks))
        rows = row_measures(self.measure, np.atleast_2d(ref_output), np.atleast_2d(output))
        if not self.pooled:
            self.outputs.add(text, rows, tokens, input_ids, delimiter)
            return
        self.outputs.add(text, rows)
        if encoder is not None:
            self.tokens.add(text, row_measures("cosine", ref_encoder, encoder), tokens, input_ids, delimiter)
            if self.cls_rows is not None:
                self.cls_rows.add(text, row_measures("cosine", ref_encoder[:1], encoder[:1]), tokens[:1],
                                  input_ids[:1], delimiter[:1])

    def metrics(self) -> dict:
        """The JSON keys: the task output's summary, and delimiter_tokens / ordinary_tokens / worst_token
        (with token_output, token_measure, delimiter_rule), worst_text (pooled) and cls_row (cls pooling)."""
        out = self.outputs.metrics()
        if self.tokens.parts:
            out.update(self.tokens.split(), worst_token=self.tokens.worst(), token_measure=self.tokens.measure,
                       token_output="encoder output (final norm)" if self.pooled else "task output",
                       delimiter_rule=DELIMITER_RULE)
        if self.pooled:
            out["worst_text"] = self.outputs.worst()
        if self.cls_rows is not None and self.cls_rows.parts:
            out["cls_row"] = {**self.cls_rows.metrics(), "worst_text": self.cls_rows.worst()["text"]}
        return out

    def text_rows(self) -> list[dict]:
        """Per text: the task output's summary, and its worst token (per-token tasks)."""
        return self.outputs.text_rows()

    def panels(self) -> list[dict]:
        """report.write_report's texts: per token errors, tokens and delimiters where known; pooled: 'output'."""
        if not self.tokens.parts:
            return [{"output": float(e[0])} for e in self.outputs.errors()]
        panels = self.tokens.panels()
        if self.pooled:
            for panel, e in zip(panels, self.outputs.errors()):
                panel["output"] = float(e[0])
        return panels


# ----------------------------------------------------------------------------- gates

GATES = {"kl": ("--max-kl", "kl_mean"), "score": ("--max-score-error", "score_abs_error_max")}


def check_gates(measure: str, max_kl: float | None, max_score_error: float | None, what: str) -> None:
    """Before any work: a gate that cannot apply to this output is an error, not a silent pass."""
    for kind, limit in (("kl", max_kl), ("score", max_score_error)):
        if limit is not None and measure != kind:
            flag = GATES[kind][0]
            instead = {"kl": "a KL gate: --max-kl", "score": "--max-score-error",
                       "cosine": "no KL or score gate (its cosine is reported)"}[measure]
            why = {"kl": "a distribution", "score": "a one-label score",
                   "cosine": "a vector compared by cosine"}[measure]
            raise UserError(f"{flag} does not apply to {what}: its output is {why}; it takes {instead}")
        if limit is not None and not limit >= 0:
            raise UserError(f"{GATES[kind][0]} must be a number >= 0, not {limit}")


def gate_results(metrics: dict, max_kl: float | None, max_score_error: float | None) -> list[dict]:
    """Each gate given: {"flag", "metric", "limit", "value", "passed"} (a NaN value fails)."""
    results = []
    for kind, limit in (("kl", max_kl), ("score", max_score_error)):
        if limit is not None:
            flag, metric = GATES[kind]
            value = metrics.get(metric)
            results.append({"flag": flag, "metric": metric, "limit": limit, "value": value,
                            "passed": value is not None and bool(value <= limit)})
    return results


def gate_exit(gates: list[dict]) -> int:
    """1 (with one error line per failed gate) when a gate failed, else 0."""
    for g in gates:
        if not g["passed"]:
            print(f"error: {g['metric']} {g['value']} exceeds {g['flag']} {g['limit']}", file=sys.stderr)
    return 1 if any(not g["passed"] for g in gates) else 0


def compare_rows(name: str, ref: np.ndarray, ours: np.ndarray, attention_mask: np.ndarray) -> dict:
    """One line of the per-module table: differences over non-padding tokens of (B, S, C) arrays."""
    valid = attention_mask.astype(bool)
    r, o = ref[valid].astype(np.float64), ours[valid].astype(np.float64)
    diff = np.nan_to_num(np.abs(o - r), nan=np.inf)
    scale = np.abs(r).max() or 1.0
    return {"module": name, "max_abs_diff": float(diff.max()), "rel_diff": float(diff.max() / scale),
            "cosine_min": cosine_metrics(r, o)["cosine_min"], "max_abs_ref": float(np.abs(r).max()),
            "max_abs": float(np.nan_to_num(np.abs(o), nan=np.inf).max())}


def merge_compare_rows(a: dict, b: dict) -> dict:
    """Two compare_rows lines of the same module over different texts, as one over all of them."""
    out = {"module": a["module"], "max_abs_diff": max(a["max_abs_diff"], b["max_abs_diff"]),
           "cosine_min": min(a["cosine_min"], b["cosine_min"]), "max_abs_ref": max(a["max_abs_ref"], b["max_abs_ref"]),
           "max_abs": max(a["max_abs"], b["max_abs"])}
    out["rel_diff"] = out["max_abs_diff"] / (out["max_abs_ref"] or 1.0)
    return out


def overflow_metrics(probe) -> dict:
    """float16 overflow counts from a model.ActivationProbe."""
    return {"overflow_count": int(probe.overflow_count), "first_overflow": probe.first_overflow}


# ----------------------------------------------------------------------------- reports

def format_table(rows: list[dict], columns: list[str]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3e}" if (v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e5)) else f"{v:.4f}"
        return str(v)
    cells = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


METRIC_KEYS = ("kl_mean", "kl_max", "top1_agreement", "top5_agreement", "cosine_min", "cosine_mean",
               "score_abs_error_max", "score_abs_error_mean", "score_rel_error_max", "max_abs_diff", "nonfinite")


def format_metrics(metrics: dict) -> str:
    keys = [k for k in (*METRIC_KEYS, "overflow_count", "first_overflow") if k in metrics]
    return "\n".join(f"  {k:<20} {metrics[k]}" for k in keys)


def describe_row(row: dict) -> str:
    """A worst_token / worst_text entry in words: where, and how far off."""
    where = f"text {row['text']}"
    if "position" in row:
        where += f", position {row['position']}, {row['token']!r}" + (" (delimiter)" if row["delimiter"] else "")
    values = {k: row[k] for k in ("kl", "top1_agrees", "cosine", "abs_error", "rel_error") if k in row}
    return where + ": " + ", ".join(f"{k} {v:.3e}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())


def format_accounting(metrics: dict) -> str:
    """The per-token part of the metrics (token_accounting, worst_text, cls_row), for the terminal."""
    lines = []
    if "delimiter_tokens" in metrics:
        lines.append(f"per token ({metrics['token_measure']} of the {metrics['token_output']}); delimiter tokens: "
                     f"{metrics['delimiter_rule']}")
        for key in ("delimiter_tokens", "ordinary_tokens"):
            part = metrics[key]
            shown = ", ".join(f"{k} {part[k]:.4g}" for k in METRIC_KEYS if k in part and k != "nonfinite")
            lines.append(f"  {key:<16} {part['tokens']:>5} tokens  {shown}")
        lines.append(f"  worst token      {describe_row(metrics['worst_token'])}")
    if "worst_text" in metrics:
        lines.append(f"  worst text       {describe_row(metrics['worst_text'])}")
    if "cls_row" in metrics:
        cls = metrics["cls_row"]
        lines.append(f"  [CLS] row        cosine_min {cls['cosine_min']:.6f}, cosine_mean {cls['cosine_mean']:.6f} "
                     f"(encoder output, the row cls pooling reads)")
    return "\n".join(lines)


def format_gates(gates: list[dict]) -> str:
    return "\n".join(f"  {'PASS' if g['passed'] else 'FAIL'}  {g['metric']} {g['value']} "
                     f"{'<=' if g['passed'] else 'exceeds'} {g['flag']} {g['limit']}" for g in gates)


