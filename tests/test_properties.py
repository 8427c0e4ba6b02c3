"""Property-based tests (hypothesis): tokenization/padding, packing and the float16 emulator's ops.

1. evaluation.tokenize (with the tokenizer checkpoint.load_tokenizer returns) and predict.encode: for any text
   (unicode, whitespace only, far too long) the non-padding ids are the tokenizer's own encoding of
   the text, truncated keeping [CLS] first and [SEP] last; masks count the real tokens; padding is
   pad_token_id on the right.
2. Packing: mlpackage.package_inputs round-trips any list of sequences through (input_ids, segment
   ids); model.ModernBert.segments / mask_biases / block_mask_bias agree with NumPy references
   (positions restart at 0 per text, block-diagonal attention, the blockwise local mask is the dense
   one in block layout); predict.pack_groups / run_all hand every text back its own rows.
3. the emulator against NumPy: tiny MIL programs with flexible (RangeDim) inputs, compiled
   once per op family and cached for the module; hypothesis draws the shapes and float16 values.
   Binary elementwise ops must be bit-exact IEEE float16 arithmetic (float32 compute + one rounding
   is exact for + - * /); everything else must lie within one float16 ulp of a float64 reference
   plus the float32 accumulation error the emulator documents (it computes in float32 and rounds
   each op's output once).

Every example set is derandomized (fixed per test function) and no example database is written,
so CI sees the same inputs on every run.
"""
import itertools
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from hypothesis.extra import numpy as hnp

from modernbert_ane import predict
from modernbert_ane.checkpoint import load_tokenizer
from modernbert_ane.evaluation import EVAL_TEXTS, tokenize
from modernbert_ane.coreml.package import package_inputs
from modernbert_ane.coreml.emulator import MLProgramEmulator
from modernbert_ane.coreml.emulator.numerics import f16 as _f16
from modernbert_ane.model import MASK_FILL, ModernBert, ModernBertConfig
from modernbert_ane.user_errors import UserError
from checkpoints import build_tokenizer
from modernbert_ane.coreml.quiet_coremltools import import_coremltools
from test_emulator import FP16, _quiet_convert, f16      # the shared MIL conversion helpers

ct = import_coremltools()
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import get_new_symbol, types  # noqa: E402
from coremltools.converters.mil.mil.ops.defs._utils import solve_slice_by_index_slice  # noqa: E402

set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "modernbert-ane-hypothesis")   # no .hypothesis/ in the tree
PROPS = settings(derandomize=True, database=None, deadline=None, print_blob=False,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def props(n):
    return settings(PROPS, max_examples=n)


# ============================================================================== 1. tokenization

@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The test tokenizer, saved and read back the way the toolkit loads one (checkpoint.load_tokenizer)."""
    folder = tmp_path_factory.mktemp("tok")
    build_tokenizer().save_pretrained(folder)
    return load_tokenizer(str(folder))


WORDS = sorted(set(" ".join(EVAL_TEXTS).lower().split())) + [
    "[MASK]", "[SEP]", "[CLS]", "[PAD]", "naïve", "Ünïcødé", "日本語", "🙂", "x" * 40, "\t", "\n"]
WHITESPACE = " \t\n\r\x0b\x0c\x1c\x85\u00a0\u1680\u2003\u2028\u3000"

texts = st.one_of(
    st.text(max_size=60),                                                   # any unicode (no surrogates)
    st.text(alphabet=WHITESPACE, max_size=12),                              # whitespace only, or empty
    st.lists(st.sampled_from(WORDS), min_size=1, max_size=20).map(" ".join),      # short sentences
    st.lists(st.sampled_from(WORDS), min_size=40, max_size=200).map(" ".join),    # far too long
)


def expected_ids(tokenizer, text, limit):
    """What a text must become: the tokenizer's own encoding, cut to `limit` keeping the final [SEP]."""
    full = list(tokenizer(text)["input_ids"])
    return full if len(full) <= limit else full[:limit - 1] + full[-1:]


@props(60)
@given(batch=st.lists(texts, min_size=1, max_size=4), max_length=st.integers(4, 48), fixed=st.booleans())
def test_tokenize_pads_and_truncates_to_the_tokenizers_own_encoding(tokenizer, batch, max_length, fixed):
    ids, mask = tokenize(tokenizer, batch, max_length, fixed_length=fixed)
    ids, mask = ids.numpy(), mask.numpy()
    cls, sep, pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    expected = [expected_ids(tokenizer, text, max_length) for text in batch]
    width = max_length if fixed else max(len(e) for e in expected)
    assert ids.shape == mask.shape == (len(batch), width)
    assert ids.dtype == mask.dtype == np.int64
    for row, m, want in zip(ids, mask, expected):
        n = int(m.sum())
        assert n == len(want) <= max_length                                   # mask sums = unpadded lengths
        assert m.tolist() == [1] * n + [0] * (width - n)                      # right padding, contiguous
        assert row[:n].tolist() == want                                       # the tokenizer's own ids
        assert row[0] == cls and row[n - 1] == sep                            # truncation keeps both ends
        assert (row[n:] == pad).all()


@props(60)
@given(text=texts, limit=st.integers(4, 40))
def test_predict_encode_agrees_with_tokenize(tokenizer, text, limit):
    full = list(tokenizer(text)["input_ids"])
    ids, mask = tokenize(tokenizer, [text], limit, fixed_length=True)
    n = int(mask.sum())
    assert predict.encode(tokenizer, text, "text 1", limit, truncate=True) == ids[0, :n].tolist()
    if len(full) > limit:
        with pytest.raises(UserError, match=f"text 1 is {len(full)} tokens, {len(full) - limit} too many"):
            predict.encode(tokenizer, text, "text 1", limit, truncate=False)
    else:
        assert predict.encode(tokenizer, text, "text 1", limit, truncate=False) == full


# ============================================================================== 2. packing

token_ids = st.integers(0, 599)
seq_lists = st.lists(st.lists(token_ids, max_size=12), max_size=6)


def segment_starts(seqs):
    return np.cumsum([0] + [len(s) for s in seqs])[:-1].tolist()


@props(80)
@given(seqs=seq_lists, spare=st.integers(0, 10), pad_id=token_ids)
def test_package_inputs_round_trip(seqs, spare, pad_id):
    total = sum(len(s) for s in seqs)
    inputs = package_inputs(seqs, total + spare, pad_id)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert set(inputs) == {"input_ids", "attention_mask"}
    assert ids.shape == mask.shape == (1, total + spare) and ids.dtype == mask.dtype == np.int32
    for k, (seq, start) in enumerate(zip(seqs, segment_starts(seqs)), start=1):
        where = np.flatnonzero(mask[0] == k)
        assert where.tolist() == list(range(start, start + len(seq)))        # contiguous, in order
        assert ids[0, where].tolist() == seq                                  # the ids come back
    assert (mask[0, :total] > 0).all() and (np.diff(mask[0, :total]) >= 0).all()
    assert (mask[0, total:] == 0).all() and (ids[0, total:] == pad_id).all()


@props(40)
@given(seqs=st.lists(st.lists(token_ids, min_size=1, max_size=8), min_size=1, max_size=5),
       short=st.integers(1, 8), pad_id=token_ids)
def test_package_inputs_never_drops_tokens_silently(seqs, short, pad_id):
    total = sum(len(s) for s in seqs)
    with pytest.raises(ValueError):
        package_inputs(seqs, max(total - short, 0), pad_id)


def tiny_model(max_texts, radius=4):
    config = ModernBertConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=2,
                              num_attention_heads=2, layer_types=("full_attention", "sliding_attention"),
                              local_attention=2 * radius, max_position_embeddings=64)
    return ModernBert(config, "encoder", max_texts=max_texts)


@st.composite
def packed_batches(draw, length_multiple=1):
    """(attention_mask (B, S), one row per list of texts as package_inputs packs it; those lists;
    a max_texts that holds every row's texts)."""
    rows = draw(st.lists(st.lists(st.lists(token_ids, max_size=9), min_size=1, max_size=5),
                         min_size=1, max_size=3))
    need = max(sum(len(s) for s in seqs) for seqs in rows)
    length = draw(st.integers(max(need, 1), need + 9))
    length = -(-length // length_multiple) * length_multiple
    masks = np.concatenate([package_inputs(seqs, length, 0)["attention_mask"] for seqs in rows])
    max_texts = draw(st.integers(max(len(seqs) for seqs in rows), 6))
    return masks, rows, max_texts


def numpy_positions(mask):
    """Each token's position within its text (-1 on padding)."""
    pos = np.full(mask.shape, -1)
    for b, row in enumerate(mask):
        for j, seg in enumerate(row):
            if seg:
                pos[b, j] = j - int(np.flatnonzero(row == seg)[0])
    return pos


@props(60)
@given(batch=packed_batches())
def test_segments_restart_positions_per_text(batch):
    mask, rows, max_texts = batch
    onehot, positions = tiny_model(max_texts).segments(torch.from_numpy(mask))
    onehot, positions = onehot.numpy(), positions.numpy()
    B, S = mask.shape
    assert onehot.shape == (B, max_texts, S) and positions.shape == (B, S)
    np.testing.assert_array_equal(onehot, mask[:, None, :] == np.arange(1, max_texts + 1)[None, :, None])
    ref = numpy_positions(mask)
    real = mask > 0
    np.testing.assert_array_equal(positions[real], ref[real])
    assert ((positions >= 0) & (positions < S)).all()        # padding too: a valid rope table row
    for b, seqs in enumerate(rows):                          # texts restart at 0 and count up by one
        for k, (seq, start) in enumerate(zip(seqs, segment_starts(seqs)), start=1):
            assert positions[b, start:start + len(seq)].tolist() == list(range(len(seq)))


def numpy_mask_biases(mask, max_texts, radius):
    """(global, local) additive biases, keys on axis 1 and queries on axis 3, as model.py documents."""
    B, S = mask.shape
    if max_texts == 1:
        keep = np.broadcast_to((mask == 1)[:, :, None], (B, S, S))
    else:
        keep = (mask[:, :, None] == mask[:, None, :]) & (mask[:, :, None] > 0)
    glob = np.where(keep, 0.0, MASK_FILL)[:, :, None, :]
    j = np.arange(S)
    far = np.abs(j[:, None] - j[None, :]) > radius
    return glob, glob + np.where(far, MASK_FILL, 0.0)[None, :, None, :]


@props(60)
@given(batch=packed_batches(), radius=st.integers(1, 6), single=st.booleans())
def test_mask_biases_are_block_diagonal_and_windowed(batch, radius, single):
    mask, rows, max_texts = batch
    if single:                                               # unpacked: a 1/0 mask and max_texts 1
        mask, max_texts = (mask > 0).astype(mask.dtype), 1
    model = tiny_model(max_texts, radius)
    glob, local = (t.numpy() for t in model.mask_biases(torch.from_numpy(mask), torch.float32))
    ref_glob, ref_local = numpy_mask_biases(mask, max_texts, radius)
    np.testing.assert_array_equal(np.broadcast_to(glob, ref_glob.shape), ref_glob)
    np.testing.assert_array_equal(local, ref_local)
    assert np.isfinite(local.astype(np.float16)).all()        # -2e4 stays finite in float16


@props(50)
@given(data=st.data(), radius=st.integers(1, 4), single=st.booleans())
def test_blockwise_local_mask_is_the_dense_mask_in_block_layout(data, radius, single):
    mask, _, max_texts = data.draw(packed_batches(length_multiple=radius))
    if single:
        mask, max_texts = (mask > 0).astype(mask.dtype), 1
    model = tiny_model(max_texts, radius)
    _, dense = model.mask_biases(torch.from_numpy(mask), torch.float32)         # (B, S, 1, S)
    model.set_local_attention("blockwise")
    _, block = model.mask_biases(torch.from_numpy(mask), torch.float32)         # (B, nb, b, 3b)
    dense, block = dense.numpy(), block.numpy()
    B, S = mask.shape
    nb, b = S // radius, radius
    assert block.shape == (B, nb, b, 3 * b)
    for n, i, jj in itertools.product(range(nb), range(b), range(3 * b)):
        q, k = n * b + i, n * b - b + jj                       # query i of block n, its jj-th neighbour key
        if 0 <= k < S:
            np.testing.assert_array_equal(block[:, n, i, jj], dense[:, k, 0, q], err_msg=f"q={q} k={k}")
        else:                                                  # beyond the sequence: always masked
            assert (block[:, n, i, jj] <= MASK_FILL).all()


@props(60)
@given(sizes=st.lists(st.integers(1, 40), max_size=12), limit=st.integers(1, 64), max_texts=st.integers(1, 5))
def test_pack_groups_are_greedy_ordered_and_bounded(sizes, limit, max_texts):
    groups = predict.pack_groups(sizes, limit, max_texts)
    assert [i for g in groups for i in g] == list(range(len(sizes)))           # every text once, in order
    for g in groups:
        assert 1 <= len(g) <= max_texts
        assert len(g) == 1 or sum(sizes[i] for i in g) <= limit
    for g, h in zip(groups, groups[1:]):                                         # greedy: h[0] did not fit in g
        assert len(g) == max_texts or sum(sizes[i] for i in g) + sizes[h[0]] > limit


class EchoRunner:
    """Stands in for PackageRunner: returns its inputs as outputs, per token or pooled per segment."""

    def __init__(self, pooled, max_texts):
        self.pooled, self.max_texts, self.calls = pooled, max_texts, []

    def predict(self, inputs):
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        self.calls.append(ids.shape)
        if not self.pooled:
            return {"hidden_states": np.stack([ids, mask], axis=-1).astype(np.float32)}       # (1, S, 2)
        rows = [[ids[mask == k].sum(), (mask == k).sum()] for k in range(1, self.max_texts + 1)]
        return {"embeddings": np.asarray([rows], np.float32)}                             # (1, K, 2)


@props(60)
@given(data=st.data(), pooled=st.booleans(), max_texts=st.integers(1, 4))
def test_run_all_hands_every_text_its_own_rows(data, pooled, max_texts):
    lengths = data.draw(st.lists(st.integers(2, 48), min_size=1, max_size=4, unique=True).map(sorted))
    seqs = data.draw(st.lists(st.lists(st.integers(0, 599), min_size=1, max_size=lengths[-1]), min_size=1,
                              max_size=8))
    runner = EchoRunner(pooled, max_texts)
    meta = {"task": "embed" if pooled else "encoder"}
    results, predictions = predict.run_all(runner, meta, seqs, lengths, 3, max_texts)
    groups = predict.pack_groups([len(s) for s in seqs], lengths[-1], max_texts)
    assert predictions == len(runner.calls) == len(groups)
    for group, shape in zip(groups, runner.calls):
        total = sum(len(seqs[i]) for i in group)
        assert shape == (1, min(n for n in lengths if n >= total))           # the smallest length that fits
        for k, i in enumerate(group, start=1):
            rows, seq = results[i]["rows"], seqs[i]
            assert results[i]["length"] == shape[1]
            if pooled:
                assert rows.tolist() == [float(np.float32(sum(seq))), float(len(seq))]
            else:
                assert rows[:, 0].tolist() == seq and (rows[:, 1] == k).all()


# ============================================================================== 3. emulator vs NumPy

MAX_SIDE = 6                 # drawn dims; the packages accept 1..RANGE
RANGE = 8


def _io(**inputs):
    """name=(dims, dtype) -> (mb.TensorSpec list, ct.TensorType list). A str dim is a symbol, shared
    by every input that names it (type inference needs matching dims); each becomes RangeDim(1, RANGE)."""
    syms = {}
    specs, tensor_types = [], []
    for name, (dims, dtype) in inputs.items():
        for d in dims:
            if isinstance(d, str) and d not in syms:
                syms[d] = get_new_symbol()
        shape = tuple(syms[d] if isinstance(d, str) else d for d in dims)
        specs.append(mb.TensorSpec(shape=shape, dtype=dtype))
        tensor_types.append(ct.TensorType(name=name, dtype=np.int32 if dtype is types.int32 else np.float32,
                                          shape=tuple(ct.RangeDim(1, RANGE) if isinstance(d, str) else d
                                                      for d in dims)))
    return specs, tensor_types


F32, I32 = types.fp32, types.int32
RANKS = (1, 2, 3, 4)
DIMS = "abcd"


def _by_rank(fn_per_rank):
    """One program with inputs x1..x4 (ranks 1..4); fn_per_rank(rank) -> {name: make(x, op_name)} gives
    the outputs, named r{rank}_{name}."""
    specs, tts = _io(**{f"x{r}": (DIMS[:r], F32) for r in RANKS})

    @mb.program(input_specs=specs, opset_version=ct.target.iOS18)
    def prog(x1, x2, x3, x4):
        outs = []
        for r, x in zip(RANKS, (x1, x2, x3, x4)):
            for name, make in fn_per_rank(r).items():
                outs.append(make(x, f"r{r}_{name}"))
        return tuple(outs)

    return prog, tts


def _binary_prog():
    specs, tts = _io(**{f"{v}{r}": (DIMS[:r], F32) for r in RANKS for v in "xy"})
    ops = ("add", "sub", "mul", "real_div", "maximum", "minimum")

    @mb.program(input_specs=specs, opset_version=ct.target.iOS18)
    def prog(x1, y1, x2, y2, x3, y3, x4, y4):
        pairs = ((x1, y1), (x2, y2), (x3, y3), (x4, y4))
        return tuple(getattr(mb, op)(x=x, y=y, name=f"r{r}_{op}") for r, (x, y) in zip(RANKS, pairs) for op in ops)

    return prog, tts


def _unary_outputs(r):
    return {"gelu_exact": lambda x, n: mb.gelu(x=x, mode="EXACT", name=n),
            "gelu_tanh": lambda x, n: mb.gelu(x=x, mode="TANH_APPROXIMATION", name=n),
            "relu": lambda x, n: mb.relu(x=x, name=n),
            "sigmoid": lambda x, n: mb.sigmoid(x=x, name=n),
            "tanh": lambda x, n: mb.tanh(x=x, name=n)}


def _axes_subsets(r):
    return [list(c) for k in range(1, r + 1) for c in itertools.combinations(range(r), k)]


def _axes_name(axes):
    return "_".join(map(str, axes))


def _reduction_outputs(r):
    outs = {}
    for axes in _axes_subsets(r):
        for op in ("sum", "mean", "max"):
            for keep in (True, False):
                if keep or len(axes) < r:          # a rank-0 result is not a Core ML output
                    # even-sized subsets are spelled with negative axes: both spellings are legal MIL
                    spelled = [a - r for a in axes] if len(axes) % 2 == 0 else axes
                    outs[f"{op}_{_axes_name(axes)}_{int(keep)}"] = (
                        lambda x, n, op=op, spelled=spelled, keep=keep:
                        getattr(mb, "reduce_" + op)(x=x, axes=spelled, keep_dims=keep, name=n))
    return outs


def _axis_name(a):
    return f"m{-a}" if a < 0 else str(a)          # op names keep [A-Za-z0-9_] only


def _softmax_outputs(r):
    return {f"softmax_{_axis_name(a)}": lambda x, n, a=a: mb.softmax(x=x, axis=a, name=n) for a in range(-r, r)}


def _transpose_outputs(r):
    return {f"perm_{_axes_name(p)}": lambda x, n, p=p: mb.transpose(x=x, perm=list(p), name=n)
            for p in itertools.permutations(range(r))}


RESHAPES = {"flat": [-1], "keep2": [0, -1], "last": [-1, 0], "lead1": [1, -1, 0, 0]}


def _reshape_outputs(r):
    return {f"reshape_{k}": lambda x, n, s=s: mb.reshape(x=x, shape=s, name=n) for k, s in RESHAPES.items()}


def _matmul_prog(batched):
    """x_tt/y_tt for every (transpose_x, transpose_y): (m, k) @ (k, n), optionally with a batch dim."""
    lead = ("b",) if batched else ()
    shapes = {}
    for tx, ty in itertools.product((0, 1), repeat=2):
        shapes[f"x{tx}{ty}"] = (lead + (("k", "m") if tx else ("m", "k")), F32)
        shapes[f"y{tx}{ty}"] = (lead + (("n", "k") if ty else ("k", "n")), F32)
    specs, tts = _io(**shapes)

    @mb.program(input_specs=specs, opset_version=ct.target.iOS18)
    def prog(x00, y00, x01, y01, x10, y10, x11, y11):
        pairs = {"00": (x00, y00), "01": (x01, y01), "10": (x10, y10), "11": (x11, y11)}
        return tuple(mb.matmul(x=x, y=y, transpose_x=t[0] == "1", transpose_y=t[1] == "1", name=f"matmul_{t}")
                     for t, (x, y) in pairs.items())

    return prog, tts


def _concat_prog():
    """For every axis of a rank-3 tensor: concat([a, b, a]) along it, b longer or shorter there."""
    shapes = {}
    for axis in range(3):
        shapes[f"a{axis}"] = (tuple("pqr"), F32)
        shapes[f"b{axis}"] = (tuple("t" if i == axis else d for i, d in enumerate("pqr")), F32)
    specs, tts = _io(**shapes)

    @mb.program(input_specs=specs, opset_version=ct.target.iOS18)
    def prog(a0, b0, a1, b1, a2, b2):
        return tuple(mb.concat(values=[a, b, a], axis=axis if axis != 2 else -1, name=f"concat_{axis}")
                     for axis, (a, b) in enumerate(((a0, b0), (a1, b1), (a2, b2))))

    return prog, tts


SLICES = {   # name -> constant stride / masks; begin and end are inputs of the program
    "plain": dict(stride=[1, 1, 1]),
    "strided": dict(stride=[2, 1, 3]),
    "reversed": dict(stride=[-1, 2, -2]),
    "masked": dict(stride=[1, -1, 2], begin_mask=[True, False, False], end_mask=[False, True, True]),
    "squeezed": dict(stride=[1, 1, 1], squeeze_mask=[False, True, False]),
}


def _slice_prog():
    specs, tts = _io(x=(tuple("pqr"), F32), begin=((3,), I32), end=((3,), I32))

    @mb.program(input_specs=specs, opset_version=ct.target.iOS18)
    def prog(x, begin, end):
        return tuple(mb.slice_by_index(x=x, begin=begin, end=end, name=f"slice_{k}", **kw) for k, kw in SLICES.items())

    return prog, tts


def _gather_prog():
    """gather (2-D indices) and gather_along_axis along every axis of a rank-3 tensor."""
    shapes = {"x": (tuple("pqr"), F32)}
    shapes.update({f"g{axis}": (("u", "v"), I32) for axis in range(3)})
    shapes.update({f"t{axis}": (tuple("w" if i == axis else d for i, d in enumerate("pqr")), I32) for axis in range(3)})
    specs, tts = _io(**shapes)

    @mb.program(input_specs=specs, opset_version=ct.target.iOS18)
    def prog(x, g0, g1, g2, t0, t1, t2):
        outs = [mb.gather(x=x, indices=g, axis=axis, name=f"gather_{axis}") for axis, g in enumerate((g0, g1, g2))]
        outs += [mb.gather_along_axis(x=x, indices=t, axis=axis, name=f"along_{axis}")
                 for axis, t in enumerate((t0, t1, t2))]
        return tuple(outs)

    return prog, tts


def _affine(c, seed):
    rng = np.random.RandomState(seed)
    return (1 + 0.5 * rng.randn(c)).astype(np.float32), (0.5 * rng.randn(c)).astype(np.float32)


def _layer_norm_prog(c):
    """Channels last (a, b, C) and channels first (a, C, 1, s), as the model normalizes."""
    specs, tts = _io(x=(("a", "b", c), F32), y=(("a", c, 1, "s"), F32))
    gamma, beta = _affine(c, c)

    @mb.program(input_specs=specs, opset_version=ct.target.iOS18)
    def prog(x, y):
        return (mb.layer_norm(x=x, axes=[-1], gamma=gamma, beta=beta, epsilon=1e-5, name="ln_last_affine"),
                mb.layer_norm(x=x, axes=[2], epsilon=1e-3, name="ln_last"),
                mb.layer_norm(x=x, axes=[1, 2], epsilon=1e-5, name="ln_last2"),
                mb.layer_norm(x=y, axes=[1], gamma=gamma, beta=beta, epsilon=1e-5, name="ln_channels"))

    return prog, tts


def _conv_weights(cin, cout):
    rng = np.random.RandomState(cin * 100 + cout)
    return rng.randn(cout, cin, 1, 1).astype(np.float32) / np.sqrt(cin), rng.randn(cout).astype(np.float32)


def _conv_prog(cin, cout):
    specs, tts = _io(x=(("n", cin, "h", "w"), F32))
    w, bias = _conv_weights(cin, cout)

    @mb.program(input_specs=specs, opset_version=ct.target.iOS18)
    def prog(x):
        return (mb.conv(x=x, weight=w, bias=bias, name="conv_bias"),
                mb.conv(x=x, weight=w, name="conv"),
                mb.conv(x=x, weight=w, bias=bias, strides=[2, 1], pad_type="valid", name="conv_strided"))

    return prog, tts


BUILDERS = {
    "binary": _binary_prog,
    "unary": lambda: _by_rank(_unary_outputs),
    "reduce": lambda: _by_rank(_reduction_outputs),
    "softmax": lambda: _by_rank(_softmax_outputs),
    "transpose": lambda: _by_rank(_transpose_outputs),
    "reshape": lambda: _by_rank(_reshape_outputs),
    "matmul": _matmul_prog,
    "concat": _concat_prog,
    "slice": _slice_prog,
    "gather": _gather_prog,
    "layer_norm": _layer_norm_prog,
    "conv": _conv_prog,
}


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    """programs(family, *key) -> MLProgramEmulator, each program converted once for the module."""
    folder = tmp_path_factory.mktemp("props-mil")
    cache = {}

    def get(family, *key):
        if (family, key) not in cache:
            prog, inputs = BUILDERS[family](*key)
            path = folder / ("-".join([family, *map(str, key)]) + ".mlpackage")
            _quiet_convert(prog, convert_to="mlprogram", compute_precision=FP16, inputs=inputs,
                           minimum_deployment_target=ct.target.macOS15).save(str(path))
            cache[family, key] = MLProgramEmulator(str(path))
        return cache[family, key]

    return get


def fp16_values(shape, bound=65504.0):
    """float16 arrays (every finite float16 in [-bound, bound], subnormals and -0 included)."""
    # fill=nothing(): every element drawn on its own (the default fills large arrays with one value)
    return hnp.arrays(np.float16, shape, elements=st.floats(-bound, bound, width=16), fill=st.nothing())


def shapes(rank, max_side=MAX_SIDE):
    return hnp.array_shapes(min_dims=rank, max_dims=rank, min_side=1, max_side=max_side)


def rank_inputs(data, emu, rank, names, bound=65504.0):
    """Inputs for a by-rank program: drawn values for `names` at `rank`, ones for the other ranks."""
    shape = data.draw(shapes(rank), label="shape")
    feeds = {n: np.ones((1,) * int(n[-1]), np.float32) for n in emu.input_names}
    drawn = {}
    for n in names:
        drawn[n] = data.draw(fp16_values(shape, bound), label=n)
        feeds[f"{n}{rank}"] = drawn[n].astype(np.float32)
    return feeds, drawn


def ulp16(v):
    """The float16 spacing at |v| (2**-24 in the subnormal range, 32 at the top of the range)."""
    a = np.minimum(np.abs(np.asarray(v, np.float64)), 32768.0).astype(np.float16)   # 32 up to 65504
    return np.spacing(a).astype(np.float64)


def assert_float16_output(got, what):
    got = np.asarray(got)
    assert got.dtype == np.float32, f"{what}: dtype {got.dtype}"
    np.testing.assert_array_equal(got, f16(got), err_msg=f"{what}: not float16-representable")


def assert_within(got, ref, extra=0.0, what=""):
    """|got - ref| <= one float16 ulp (at the larger of the two) + extra, elementwise; NaN fails."""
    assert_float16_output(got, what)
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    tol = np.broadcast_to(ulp16(np.maximum(np.abs(got), np.abs(ref))) + extra, got.shape)
    bad = ~(np.abs(got - ref) <= tol)
    if bad.any():
        i = tuple(np.argwhere(bad)[0])
        raise AssertionError(f"{what}: at {i} got {got[i]!r}, reference {ref[i]!r} (tolerance {tol[i]:.3g}); "
                             f"{int(bad.sum())} of {got.size} out of tolerance")


def assert_bits_equal(got, ref, what):
    """Same float16 values bit for bit (signed zeros and infinities included); NaN where ref is NaN."""
    assert_float16_output(got, what)
    got16, ref16 = np.asarray(got).astype(np.float16), np.asarray(ref, np.float16)
    assert got16.shape == ref16.shape, f"{what}: shape {got16.shape} != {ref16.shape}"
    nan = np.isnan(ref16)
    np.testing.assert_array_equal(np.isnan(got16), nan, err_msg=f"{what}: NaN positions")
    np.testing.assert_array_equal(got16[~nan].view(np.uint16), ref16[~nan].view(np.uint16), err_msg=what)


def assert_ops(emu, **expected):
    """The converted program still has the ops under test (coremltools' passes fold and fuse)."""
    counts = emu.op_type_counts()
    assert {op: counts.get(op, 0) for op in expected} == expected, f"conversion changed the ops: {counts}"


# ---- exact float16 rounding

@props(60)
@given(x=hnp.arrays(np.float32, st.integers(0, 300), elements=st.floats(width=32)))
def test_float16_rounding_is_numpy_astype_bit_for_bit(x):
    with np.errstate(all="ignore"):
        expected = x.astype(np.float16).astype(np.float32)
    got = _f16(x)
    assert got.dtype == np.float32 and got.shape == x.shape
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[~nan].view(np.uint32), expected[~nan].view(np.uint32))


# ---- elementwise

@props(40)
@given(data=st.data(), rank=st.sampled_from(RANKS))
def test_binary_elementwise_ops_are_ieee_float16(programs, data, rank):
    emu = programs("binary")
    assert_ops(emu, add=4, sub=4, mul=4, real_div=4, maximum=4, minimum=4)
    shape = data.draw(shapes(rank), label="shape")
    x, y = data.draw(fp16_values(shape), label="x"), data.draw(fp16_values(shape), label="y")
    feeds = {n: np.ones((1,) * int(n[-1]), np.float32) for n in emu.input_names}
    feeds.update({f"x{rank}": x.astype(np.float32), f"y{rank}": y.astype(np.float32)})
    out = emu.predict(feeds)
    with np.errstate(all="ignore"):          # float16 overflow -> inf, 0/0 -> NaN: the same on both sides
        refs = {"add": x + y, "sub": x - y, "mul": x * y, "real_div": x / y}
    for op, ref in refs.items():
        assert_bits_equal(out[f"r{rank}_{op}"], ref, f"{op} rank {rank}")
    # maximum(+0, -0) may be either zero (IEEE leaves it open; NumPy's float16 and float32 loops differ)
    np.testing.assert_array_equal(out[f"r{rank}_maximum"], np.maximum(x, y), err_msg=f"maximum rank {rank}")
    np.testing.assert_array_equal(out[f"r{rank}_minimum"], np.minimum(x, y), err_msg=f"minimum rank {rank}")


def _erf(x):
    from scipy.special import erf
    return erf(x)


UNARY_REFS = {
    "gelu_exact": lambda x: 0.5 * x * (1 + _erf(x / math.sqrt(2))),
    "gelu_tanh": lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))),
    "relu": lambda x: np.maximum(x, 0),
    "sigmoid": lambda x: 0.5 * (1 + np.tanh(x / 2)),           # no overflow in exp for large |x|
    "tanh": np.tanh,
}


@props(40)
@given(data=st.data(), rank=st.sampled_from(RANKS), bound=st.sampled_from([8.0, 65504.0]))
def test_activations_match_float64_within_float16_rounding(programs, data, rank, bound):
    emu = programs("unary")
    assert_ops(emu, gelu=8, relu=4, sigmoid=4, tanh=4)
    feeds, drawn = rank_inputs(data, emu, rank, ["x"], bound)
    out = emu.predict(feeds)
    x = drawn["x"].astype(np.float64)
    for name, ref in UNARY_REFS.items():
        with np.errstate(all="ignore"):
            r = ref(x)
        # GELU's 1 + erf / 1 + tanh cancels for x << 0 in the emulator's float32 arithmetic: an absolute
        # error of ~|x| * 2**-24 on results below 1e-6 (documented: ops compute in float32).
        extra = 2.0 ** -24 * (1 + np.abs(x)) if name.startswith("gelu") else 0.0
        assert_within(out[f"r{rank}_{name}"], r, extra, f"{name} rank {rank}")
    np.testing.assert_array_equal(out[f"r{rank}_relu"], np.maximum(x, 0))   # relu is exact


# ---- reductions and softmax

@props(40)
@given(data=st.data(), rank=st.sampled_from(RANKS))
def test_reductions_over_every_axis_subset(programs, data, rank):
    emu = programs("reduce")
    assert_ops(emu, reduce_sum=48, reduce_mean=48, reduce_max=48)
    # |x| <= 48: a sum of up to 6**4 values stays below float16's 65504 (overflow: the binary ops test)
    feeds, drawn = rank_inputs(data, emu, rank, ["x"], bound=48.0)
    out = emu.predict(feeds)
    x = drawn["x"].astype(np.float64)
    for axes in _axes_subsets(rank):
        ax = tuple(axes)
        n = int(np.prod([x.shape[a] for a in axes]))
        abs_sum = np.abs(x).sum(axis=ax, keepdims=True)
        for keep in (True, False):
            if not keep and len(axes) == rank:
                continue
            tag = f"{_axes_name(axes)}_{int(keep)}"
            squeeze = (lambda v: v) if keep else (lambda v: np.squeeze(v, axis=ax))
            what = f"rank {rank} axes {axes} keep_dims={keep}"
            # float32 accumulation: at most n * 2**-24 * sum|x| before the final float16 rounding
            assert_within(out[f"r{rank}_sum_{tag}"], x.sum(axis=ax, keepdims=keep),
                          squeeze(n * 2.0 ** -24 * abs_sum), "reduce_sum " + what)
            assert_within(out[f"r{rank}_mean_{tag}"], x.mean(axis=ax, keepdims=keep),
                          squeeze(2.0 ** -24 * abs_sum), "reduce_mean " + what)
            np.testing.assert_array_equal(out[f"r{rank}_max_{tag}"], x.max(axis=ax, keepdims=keep),
                                          err_msg="reduce_max " + what)


@props(40)
@given(data=st.data(), rank=st.sampled_from(RANKS), bound=st.sampled_from([4.0, 30.0, 65504.0]))
def test_softmax_over_every_axis(programs, data, rank, bound):
    emu = programs("softmax")
    assert_ops(emu, softmax=20)
    feeds, drawn = rank_inputs(data, emu, rank, ["x"], bound)
    out = emu.predict(feeds)
    x = drawn["x"].astype(np.float64)
    for axis in range(-rank, rank):
        e = np.exp(x - x.max(axis=axis, keepdims=True))
        ref = e / e.sum(axis=axis, keepdims=True)
        got = out[f"r{rank}_softmax_{_axis_name(axis)}"]
        n = x.shape[axis]
        # float32 exp / sum / divide: relative error ~(n + 4) * 2**-24 of the probability
        assert_within(got, ref, (n + 4) * 2.0 ** -24 * ref, f"softmax rank {rank} axis {axis}")
        # each row sums to 1 within float16 rounding of its entries
        assert np.all(np.abs(got.astype(np.float64).sum(axis=axis) - 1) <= n * 2.0 ** -11 + 1e-7)


# ---- linear algebra

@props(30)
@given(data=st.data(), batched=st.booleans())
def test_matmul_with_transposes(programs, data, batched):
    emu = programs("matmul", batched)
    assert_ops(emu, matmul=4)
    dims = {d: data.draw(st.integers(1, MAX_SIDE), label=d) for d in "bmkn"}
    lead = (dims["b"],) if batched else ()
    feeds, refs = {}, {}
    for tx, ty in itertools.product((0, 1), repeat=2):
        a = data.draw(fp16_values(lead + (dims["m"], dims["k"]), 64.0))
        b = data.draw(fp16_values(lead + (dims["k"], dims["n"]), 64.0))
        feeds[f"x{tx}{ty}"] = (np.swapaxes(a, -1, -2) if tx else a).astype(np.float32)
        feeds[f"y{tx}{ty}"] = (np.swapaxes(b, -1, -2) if ty else b).astype(np.float32)
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        refs[f"{tx}{ty}"] = (a64 @ b64, np.abs(a64) @ np.abs(b64))
    out = emu.predict(feeds)
    for t, (ref, abs_ref) in refs.items():
        assert_within(out[f"matmul_{t}"], ref, dims["k"] * 2.0 ** -24 * abs_ref,
                      f"matmul transpose_x={t[0]} transpose_y={t[1]} batched={batched}")


@props(30)
@given(data=st.data(), channels=st.sampled_from([(3, 4), (16, 8)]))
def test_conv_1x1_is_a_channel_matmul(programs, data, channels):
    cin, cout = channels
    emu = programs("conv", cin, cout)
    assert_ops(emu, conv=3)
    n, h, w = (data.draw(st.integers(1, MAX_SIDE), label=d) for d in "nhw")
    x = data.draw(fp16_values((n, cin, h, w), 64.0), label="x")
    out = emu.predict({"x": x.astype(np.float32)})
    weight, bias = _conv_weights(cin, cout)
    w16, b16 = f16(weight[:, :, 0, 0]).astype(np.float64), f16(bias).astype(np.float64)   # weights are float16
    x64 = x.astype(np.float64)
    mm = np.einsum("oc,nchw->nohw", w16, x64)
    err = cin * 2.0 ** -24 * np.einsum("oc,nchw->nohw", np.abs(w16), np.abs(x64))
    assert_within(out["conv"], mm, err, "conv 1x1")
    assert_within(out["conv_bias"], mm + b16[None, :, None, None], err, "conv 1x1 + bias")
    assert_within(out["conv_strided"], (mm + b16[None, :, None, None])[:, :, ::2], err[:, :, ::2],
                  "conv 1x1 stride 2")


@props(40)
@given(data=st.data(), c=st.sampled_from([1, 5, 16]), bound=st.sampled_from([4.0, 1000.0]))
def test_layer_norm_channels_last_and_first(programs, data, c, bound):
    emu = programs("layer_norm", c)
    assert_ops(emu, layer_norm=4)
    a, b, s = (data.draw(st.integers(1, MAX_SIDE), label=d) for d in "abs")
    x = data.draw(fp16_values((a, b, c), bound), label="x")
    y = data.draw(fp16_values((a, c, 1, s), bound), label="y")
    out = emu.predict({"x": x.astype(np.float32), "y": y.astype(np.float32)})
    gamma, beta = (f16(p).astype(np.float64) for p in _affine(c, c))   # constants are float16 in the package

    def check(name, v, axes, eps, affine_shape=None):
        v = v.astype(np.float64)
        eps = float(f16(eps))
        mean = v.mean(axis=axes, keepdims=True)
        sigma = np.sqrt(((v - mean) ** 2).mean(axis=axes, keepdims=True) + eps)
        norm = (v - mean) / sigma
        n = int(np.prod([v.shape[i] for i in axes]))
        # float32 mean: error <= n * 2**-24 * max|x| before it is subtracted, i.e. / sigma in the output
        err = n * 2.0 ** -24 * (np.abs(v).max(axis=axes, keepdims=True) / sigma + np.abs(norm))
        ref = norm
        if affine_shape is not None:
            g, bt = gamma.reshape(affine_shape), beta.reshape(affine_shape)
            ref, err = norm * g + bt, err * np.abs(g)
        assert_within(out[name], ref, err, f"{name} c={c}")

    check("ln_last_affine", x, (2,), 1e-5, (1, 1, c))
    check("ln_last", x, (2,), 1e-3)
    check("ln_last2", x, (1, 2), 1e-5)
    check("ln_channels", y, (1,), 1e-5, (1, c, 1, 1))


# ---- data movement: exact

@props(30)
@given(data=st.data(), rank=st.sampled_from(RANKS))
def test_transpose_every_permutation(programs, data, rank):
    emu = programs("transpose")
    feeds, drawn = rank_inputs(data, emu, rank, ["x"])
    out = emu.predict(feeds)
    for perm in itertools.permutations(range(rank)):
        np.testing.assert_array_equal(out[f"r{rank}_perm_{_axes_name(perm)}"], np.transpose(drawn["x"], perm),
                                      err_msg=f"perm {perm}")


def mil_reshape_shape(x_shape, shape):
    """MIL iOS17 reshape: a 0 copies x's dim at the same position counted from the right (1 beyond x's
    rank), -1 takes the rest."""
    out = list(shape)
    for i, d in enumerate(shape):
        if d == 0:
            j = len(x_shape) - (len(shape) - i)
            out[i] = x_shape[j] if j >= 0 else 1
    if -1 in out:
        known = int(np.prod([d for d in out if d != -1]))
        out[out.index(-1)] = int(np.prod(x_shape)) // known
    return tuple(out)


@props(30)
@given(data=st.data(), rank=st.sampled_from(RANKS))
def test_reshape_with_zero_and_minus_one(programs, data, rank):
    emu = programs("reshape")
    feeds, drawn = rank_inputs(data, emu, rank, ["x"])
    out = emu.predict(feeds)
    x = drawn["x"]
    for key, shape in RESHAPES.items():
        want = x.reshape(mil_reshape_shape(x.shape, shape))
        np.testing.assert_array_equal(out[f"r{rank}_reshape_{key}"], want, err_msg=f"reshape {shape} of {x.shape}")
        assert out[f"r{rank}_reshape_{key}"].shape == want.shape


@props(30)
@given(data=st.data())
def test_concat_along_every_axis(programs, data):
    emu = programs("concat")
    assert_ops(emu, concat=3)
    p, q, r = (data.draw(st.integers(1, MAX_SIDE), label=d) for d in "pqr")
    feeds, refs = {}, {}
    for axis in range(3):
        a = data.draw(fp16_values((p, q, r)), label=f"a{axis}")
        shape = [p, q, r]
        shape[axis] = data.draw(st.integers(1, RANGE), label=f"t{axis}")
        b = data.draw(fp16_values(tuple(shape)), label=f"b{axis}")
        feeds[f"a{axis}"], feeds[f"b{axis}"] = a.astype(np.float32), b.astype(np.float32)
        refs[axis] = np.concatenate([a, b, a], axis=axis)
    out = emu.predict(feeds)
    for axis, ref in refs.items():
        np.testing.assert_array_equal(out[f"concat_{axis}"], ref, err_msg=f"concat axis {axis}")


@props(60)
@given(data=st.data())
def test_slice_by_index_matches_coremltools_reference_semantics(programs, data):
    emu = programs("slice")
    assert_ops(emu, slice_by_index=5)
    shape = data.draw(shapes(3), label="shape")
    x = data.draw(fp16_values(shape), label="x")
    bounds = [st.integers(-d - 2, d + 2) for d in shape]
    begin = np.asarray(data.draw(st.tuples(*bounds), label="begin"), np.int32)
    end = np.asarray(data.draw(st.tuples(*bounds), label="end"), np.int32)
    # a squeezed axis selects one element: begin must name one
    begin[1] = data.draw(st.integers(-shape[1], shape[1] - 1), label="begin[1]")
    out = emu.predict({"x": x.astype(np.float32), "begin": begin, "end": end})
    for name, kw in SLICES.items():
        # the reference: coremltools' own value inference for slice_by_index (NumPy slicing)
        sl = solve_slice_by_index_slice(shape, begin, end, list(kw["stride"]), kw.get("begin_mask"),
                                        kw.get("end_mask"), kw.get("squeeze_mask"))
        ref = x[sl]
        if kw.get("squeeze_mask"):
            ref = np.squeeze(ref, axis=tuple(i for i, m in enumerate(kw["squeeze_mask"]) if m))
        got = out[f"slice_{name}"]
        note(f"{name}: begin {begin.tolist()} end {end.tolist()} -> {ref.shape}")
        assert got.shape == ref.shape, f"slice {name}: shape {got.shape} != {ref.shape}"
        np.testing.assert_array_equal(got, ref, err_msg=f"slice {name}")


@props(40)
@given(data=st.data())
def test_gather_and_gather_along_axis(programs, data):
    emu = programs("gather")
    assert_ops(emu, gather=3, gather_along_axis=3)
    shape = data.draw(shapes(3), label="shape")
    x = data.draw(fp16_values(shape), label="x")
    feeds, refs = {"x": x.astype(np.float32)}, {}
    u, v = data.draw(st.integers(1, MAX_SIDE), label="u"), data.draw(st.integers(1, MAX_SIDE), label="v")
    w = data.draw(st.integers(1, RANGE), label="w")
    for axis, d in enumerate(shape):
        # non-negative: coremltools' add_int16_cast may store index inputs as uint16 (it carries the
        # dtype it chose for an earlier op's constant over to inputs), where -1 cannot be represented
        g = data.draw(hnp.arrays(np.int32, (u, v), elements=st.integers(0, d - 1)), label=f"g{axis}")
        t_shape = list(shape)
        t_shape[axis] = w
        t = data.draw(hnp.arrays(np.int32, tuple(t_shape), elements=st.integers(0, d - 1)), label=f"t{axis}")
        feeds[f"g{axis}"], feeds[f"t{axis}"] = g, t
        refs[f"gather_{axis}"] = np.take(x, g, axis=axis)
        refs[f"along_{axis}"] = np.take_along_axis(x, t, axis=axis)
    out = emu.predict(feeds)
    for name, ref in refs.items():
        np.testing.assert_array_equal(out[name], ref, err_msg=name)
        assert out[name].shape == ref.shape
