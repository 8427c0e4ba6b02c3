"""Tests for the emulator (modernbert_ane/coreml/emulator): convert tiny torch modules / MIL programs with coremltools,
save them as .mlpackage, run them with the NumPy emulator and compare with float32 references."""
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modernbert_ane.coreml.quiet_coremltools import import_coremltools  # noqa: E402

ct = import_coremltools()
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402

import modernbert_ane.coreml.emulator as emu_mod  # noqa: E402
from modernbert_ane.coreml.emulator import (  # noqa: E402
    EmulationError,
    MLProgramEmulator,
    NotAnMLPackageError,
    UnsupportedOpError,
)

FP16 = ct.precision.FLOAT16


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------

def f16(x):
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


def assert_fp16_close(actual, expected, tol=1e-2, name=""):
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    scale = max(1.0, float(np.max(np.abs(expected))) if expected.size else 1.0)
    err = float(np.max(np.abs(actual - expected))) if expected.size else 0.0
    assert err <= tol * scale, f"{name}: max abs error {err:.4g} > {tol * scale:.4g}"


def _quiet_convert(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ct.convert(*args, **kwargs)


def convert_torch(module, examples, inputs, path, target=ct.target.macOS15):
    module = module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace deprecation / tracer warnings
        traced = torch.jit.trace(module, examples)
    ml = _quiet_convert(traced, inputs=inputs, convert_to="mlprogram", compute_precision=FP16,
                        minimum_deployment_target=target)
    ml.save(str(path))
    return str(path)


def convert_mil(prog, path, target=ct.target.macOS15):
    ml = _quiet_convert(prog, convert_to="mlprogram", compute_precision=FP16, minimum_deployment_target=target)
    ml.save(str(path))
    return str(path)


def proto_ops(path, function="main"):
    spec = ct.utils.load_spec(str(path))
    f = spec.mlProgram.functions[function]
    return list(f.block_specializations[f.opset].operations)


def _const_strings(ops):
    return {op.outputs[0].name: op.attributes["val"].immediateValue.tensor.strings.values[0]
            for op in ops if op.type == "const" and op.attributes["val"].immediateValue.tensor.strings.values}


def cast_targets(path):
    """dtype strings of every cast op in the package."""
    ops = proto_ops(path)
    strings = _const_strings(ops)
    out = []
    for op in ops:
        if op.type == "cast":
            arg = op.inputs["dtype"].arguments[0]
            if arg.WhichOneof("binding") == "value":
                out.append(arg.value.immediateValue.tensor.strings.values[0])
            else:
                out.append(strings[arg.name])
    return out


def gather_index_dtypes(path):
    """MIL dtype names of the `indices` of every gather whose `x` is a constant table."""
    from coremltools.proto import MIL_pb2

    ops = proto_ops(path)
    consts = {op.outputs[0].name for op in ops if op.type == "const"}
    dtypes = {o.name: MIL_pb2.DataType.Name(o.type.tensorType.dataType) for op in ops for o in op.outputs}
    return [dtypes.get(op.inputs["indices"].arguments[0].name, "INT32") for op in ops
            if op.type == "gather" and op.inputs["x"].arguments[0].name in consts]


# --------------------------------------------------------------------------------------
# 1. Channels-first encoder block (macOS15, EnumeratedShapes on two int32 inputs)
# --------------------------------------------------------------------------------------

VOCAB, D, HEADS, FF, WINDOW = 50368, 32, 2, 48, 4
HD = D // HEADS


def _ln_cf(x, w, eps=1e-5):
    zm = x - x.mean(1, keepdim=True)
    var = (zm * zm).mean(1, keepdim=True)
    return zm * torch.rsqrt(var + eps) * w.view(1, -1, 1, 1)


class Encoder(torch.nn.Module):
    """ANE-style block on (B, C, 1, S): embedding, layer norms written out by hand,
    1x1 convs, rotary slices/concat, einsum attention with a local mask built in-graph
    from the int32 attention mask, GLU with exact gelu."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, D)
        self.n0 = torch.nn.Parameter(1 + 0.1 * torch.randn(D))
        self.n1 = torch.nn.Parameter(1 + 0.1 * torch.randn(D))
        self.n2 = torch.nn.Parameter(1 + 0.1 * torch.randn(D))
        self.qkv = torch.nn.Conv2d(D, 3 * D, 1, bias=False)
        self.o = torch.nn.Conv2d(D, D, 1)
        self.wi = torch.nn.Conv2d(D, 2 * FF, 1, bias=False)
        self.wo = torch.nn.Conv2d(FF, D, 1)
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, HD, 2).float() / HD)))

    def forward(self, input_ids, attention_mask):
        s = input_ids.shape[1]
        x = self.emb(input_ids).transpose(1, 2).unsqueeze(2)  # (1, D, 1, S)
        x = _ln_cf(x, self.n0)
        pos = torch.arange(s)
        local = (pos[:, None] - pos[None, :]).abs() <= WINDOW  # (k, q)
        allowed = local & (attention_mask[0] > 0)[:, None]
        bias = ((allowed.float() - 1.0) * 1e4)[None, :, None, :]  # (1, k, 1, q)
        freqs = pos.float()[:, None] * self.inv_freq[None, :]
        rot = torch.cat([freqs, freqs], dim=1).t()[None, :, None, :]  # (1, HD, 1, S)
        cos, sin = rot.cos(), rot.sin()

        h = _ln_cf(x, self.n1)
        q, k, v = self.qkv(h).split(D, dim=1)
        heads = []
        for i in range(HEADS):
            sl = slice(i * HD, (i + 1) * HD)
            qi, ki, vi = q[:, sl], k[:, sl], v[:, sl]

            def rope(t):
                return t * cos + torch.cat([-t[:, HD // 2:], t[:, : HD // 2]], dim=1) * sin

            qi, ki = rope(qi), rope(ki)
            w = torch.einsum("bchq,bchk->bkhq", qi, ki) * (1.0 / math.sqrt(HD)) + bias
            w = w.softmax(dim=1)
            heads.append(torch.einsum("bkhq,bchk->bchq", w, vi))
        x = x + self.o(torch.cat(heads, dim=1))
        g, u = self.wi(_ln_cf(x, self.n2)).chunk(2, dim=1)
        x = x + self.wo(F.gelu(g) * u)
        return _ln_cf(x, self.n0)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    torch.manual_seed(0)
    model = Encoder().eval()
    ids = torch.randint(0, VOCAB, (1, 8), dtype=torch.int32)
    mask = torch.ones(1, 8, dtype=torch.int32)
    shapes = ct.EnumeratedShapes(shapes=[[1, 8], [1, 16]], default=[1, 8])
    path = convert_torch(
        model, (ids, mask),
        [ct.TensorType(name="input_ids", shape=shapes, dtype=np.int32),
         ct.TensorType(name="attention_mask", shape=shapes, dtype=np.int32)],
        tmp_path_factory.mktemp("enc") / "encoder.mlpackage",
    )
    return model, path, MLProgramEmulator(path)


def _encoder_inputs(s, pad=3):
    rng = np.random.RandomState(s)
    ids = rng.randint(0, VOCAB, (1, s)).astype(np.int32)
    ids[0, :3] = [40000, VOCAB - 1, 32768]  # beyond int16 range
    mask = np.ones((1, s), np.int32)
    mask[0, s - pad:] = 0
    return ids, mask


def test_encoder_emits_expected_ops(encoder):
    _, path, emu = encoder
    counts = emu.op_type_counts()
    for op in ("conv", "layer_norm", "softmax", "gelu", "gather", "split", "concat", "slice_by_index",
               "range_1d", "shape", "select", "einsum"):
        assert counts.get(op, 0) > 0, f"expected a {op} op, got {counts}"
    # the hand-written mean/var/rsqrt normalization is fused to one layer_norm op each
    assert counts["layer_norm"] == 4
    assert "reduce_mean" not in counts and "rsqrt" not in counts
    conv_ops = [op for op in proto_ops(path) if op.type == "conv"]
    assert len(conv_ops) == 4
    assert emu.input_names == ["input_ids", "attention_mask"]
    assert len(emu.output_names) == 1


@pytest.mark.parametrize("seq_len", [8, 16])
def test_encoder_matches_torch_at_both_enumerated_lengths(encoder, seq_len):
    model, _, emu = encoder
    ids, mask = _encoder_inputs(seq_len)
    out = emu.predict({"input_ids": ids, "attention_mask": mask})
    (got,) = out.values()
    with torch.no_grad():
        ref = model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    assert got.dtype == np.float32
    assert np.all(np.isfinite(got))
    assert_fp16_close(got, ref, tol=2e-2, name=f"encoder S={seq_len}")


def test_embedding_gather_has_no_int16_wrap(encoder):
    model, path, emu = encoder
    # vocab 50368 > 32767: coremltools keeps the embedding gather indices int32 ...
    assert gather_index_dtypes(path) == ["INT32"]
    ids, mask = _encoder_inputs(8)
    gathered = {}

    def observe(name, op_type, value):
        if op_type == "gather" and value.dtype == np.float32 and value.ndim == 3:
            gathered[name] = np.array(value)

    emu.predict({"input_ids": ids, "attention_mask": mask}, observe=observe)
    (rows,) = gathered.values()
    # ... and ids 40000, 50367, 32768 fetch exactly their own embedding rows
    expected = f16(model.emb.weight.detach().numpy()[ids[0]])
    np.testing.assert_array_equal(rows[0], expected)


def test_encoder_pessimistic_mode_stays_close(encoder):
    model, path, _ = encoder
    emu = MLProgramEmulator(path, pessimistic=True)
    ids, mask = _encoder_inputs(16)
    (got,) = emu.predict({"input_ids": ids, "attention_mask": mask}).values()
    with torch.no_grad():
        ref = model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    assert np.all(np.isfinite(got))
    assert_fp16_close(got, ref, tol=5e-2, name="pessimistic encoder")


def test_input_specs_report_enumerated_shapes(encoder):
    specs = encoder[2].input_specs()
    assert set(specs) == {"input_ids", "attention_mask"}
    for spec in specs.values():
        assert spec["dtype"] == np.dtype(np.int32)
        assert spec["enumerated_shapes"] == [(1, 8), (1, 16)]
        assert spec["shape"] == (1, 8)


def test_input_validation_errors_name_the_inputs(encoder):
    emu = encoder[2]
    ids, mask = _encoder_inputs(8)
    with pytest.raises(ValueError) as e:
        emu.predict({"input_ids": ids})
    assert "attention_mask" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError) as e:
        emu.predict({"input_ids": ids, "attention_mask": mask, "token_type_ids": mask})
    assert "token_type_ids" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError) as e:
        emu.predict({"input_ids": np.zeros((1, 12), np.int32), "attention_mask": np.ones((1, 12), np.int32)})
    msg = str(e.value)
    assert "input_ids" in msg and "(1, 12)" in msg and "\n" not in msg


def test_observe_is_called_for_every_op(encoder):
    _, path, emu = encoder
    expected = {}
    for op in proto_ops(path):
        if op.type != "const":
            name = op.attributes["name"].immediateValue.tensor.strings.values[0]
            expected[name] = (op.type, len(op.outputs))
    calls = []
    ids, mask = _encoder_inputs(8)
    emu.predict({"input_ids": ids, "attention_mask": mask},
                observe=lambda n, t, v: calls.append((n, t, v)))
    assert len(calls) == sum(n for _, n in expected.values())
    assert {n for n, _, _ in calls} == set(expected)
    for name, op_type, value in calls:
        assert expected[name][0] == op_type
        assert isinstance(value, np.ndarray)
        if value.dtype.kind == "f":  # every float output is float16-representable
            np.testing.assert_array_equal(value, f16(value))


def test_missing_op_in_dispatch_table_raises_unsupported(encoder, monkeypatch):
    monkeypatch.delitem(emu_mod.registry.OPS, "softmax")
    with pytest.raises(UnsupportedOpError) as e:
        MLProgramEmulator(encoder[1])
    msg = str(e.value)
    assert "softmax" in msg and "\n" not in msg
    softmax_names = [op.attributes["name"].immediateValue.tensor.strings.values[0]
                     for op in proto_ops(encoder[1]) if op.type == "softmax"]
    assert any(n in msg for n in softmax_names)


def test_unknown_function_name(encoder):
    with pytest.raises(ValueError, match="nope"):
        MLProgramEmulator(encoder[1], function_name="nope")


# --------------------------------------------------------------------------------------
# 2. Token-major transformer (nn.Linear / nn.LayerNorm / matmul attention / SDPA)
#    converted for iOS16 (no int16, SDPA decomposed) and macOS15 (SDPA op, int16 ids)
# --------------------------------------------------------------------------------------

SMALL_VOCAB = 1000


class TokenMajor(torch.nn.Module):
    def __init__(self, d=32, heads=4):
        super().__init__()
        self.emb = torch.nn.Embedding(SMALL_VOCAB, d)
        self.ln = torch.nn.LayerNorm(d)
        self.ln_out = torch.nn.LayerNorm(d, elementwise_affine=False)
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.o = torch.nn.Linear(d, d)
        self.heads = heads

    def forward(self, input_ids, attention_mask):
        b, s = input_ids.shape
        x = self.ln(self.emb(input_ids))
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        mask = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + mask, dim=-1)
        a = (w @ v).transpose(1, 2).reshape(b, s, -1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, s, -1)
        out = self.ln_out(x + self.o(a) + F.gelu(y, approximate="tanh"))
        return out, out.sum(-1).argmax(dim=-1)


@pytest.fixture(scope="module")
def token_major(tmp_path_factory):
    torch.manual_seed(1)
    model = TokenMajor().eval()
    ids = torch.randint(0, SMALL_VOCAB, (1, 12), dtype=torch.int32)
    mask = torch.ones(1, 12, dtype=torch.int32)
    d = tmp_path_factory.mktemp("tok")
    inputs = [ct.TensorType(name="input_ids", shape=(1, 12), dtype=np.int32),
              ct.TensorType(name="attention_mask", shape=(1, 12), dtype=np.int32)]
    p16 = convert_torch(model, (ids, mask), inputs, d / "tok_ios16.mlpackage", target=ct.target.iOS16)
    p18 = convert_torch(model, (ids, mask), inputs, d / "tok_macos15.mlpackage", target=ct.target.macOS15)
    return model, p16, p18


def _tok_inputs():
    rng = np.random.RandomState(3)
    ids = rng.randint(0, SMALL_VOCAB, (1, 12)).astype(np.int32)
    mask = np.ones((1, 12), np.int32)
    mask[0, -4:] = 0
    return ids, mask


@pytest.mark.parametrize("which", ["ios16", "macos15"])
def test_token_major_matches_torch(token_major, which):
    model, p16, p18 = token_major
    emu = MLProgramEmulator(p16 if which == "ios16" else p18)
    counts = emu.op_type_counts()
    assert counts.get("linear", 0) >= 2 and counts.get("layer_norm", 0) == 2 and counts.get("matmul", 0) >= 2
    if which == "macos15":
        assert counts.get("scaled_dot_product_attention", 0) == 1
    ids, mask = _tok_inputs()
    out, idx = emu.predict({"input_ids": ids, "attention_mask": mask}).values()
    with torch.no_grad():
        ref_out, ref_idx = model(torch.from_numpy(ids), torch.from_numpy(mask))
    assert_fp16_close(out, ref_out.numpy(), tol=2e-2, name=which)
    assert idx.dtype == np.int32 and idx.shape == (1,)


def test_int16_index_cast_is_reported_not_wrapped(token_major):
    _, p16, p18 = token_major
    ids, mask = _tok_inputs()
    ids[0, 2] = 40000  # fits int32, not int16
    # macOS15 (iOS17+): coremltools narrows the small-vocab gather indices to int16
    assert "int16" in cast_targets(p18) and gather_index_dtypes(p18) == ["INT16"]
    with pytest.raises(EmulationError) as e:
        MLProgramEmulator(p18).predict({"input_ids": ids, "attention_mask": mask})
    assert "cast" in str(e.value) and "40000" in str(e.value) and "int16" in str(e.value)
    # iOS16: no int16 cast; the out-of-range gather index itself is reported
    assert "int16" not in cast_targets(p16) and gather_index_dtypes(p16) == ["INT32"]
    with pytest.raises(EmulationError) as e:
        MLProgramEmulator(p16).predict({"input_ids": ids, "attention_mask": mask})
    assert "gather" in str(e.value) and "40000" in str(e.value)


# --------------------------------------------------------------------------------------
# 3. Assorted torch ops (convs, norms, reductions, activations, data movement)
# --------------------------------------------------------------------------------------

class Assorted(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c3 = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.dw = torch.nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8)
        self.grp = torch.nn.Conv2d(8, 4, (1, 3), padding=(0, 1), groups=2, bias=False)
        self.c1 = torch.nn.Conv1d(8, 4, 5, padding=2)
        self.inorm = torch.nn.InstanceNorm2d(8, affine=True)

    def forward(self, x, idx):
        return (
            self.c3(x), self.dw(x), self.grp(x), self.c1(x.mean(2)), self.inorm(x),
            F.normalize(x, dim=1), torch.cumsum(x, dim=3), torch.gather(x, 3, idx),
            F.pad(x, (1, 2, 0, 1)), torch.stack([x[:, 0], x[:, 1]], dim=1), x.repeat(1, 2, 1, 1),
            torch.where(x > 0, torch.sigmoid(x), F.silu(x)),
            torch.clamp(x, -0.5, 0.5) + x.abs().sqrt() + torch.exp(-x * x) + torch.log(x.abs() + 1)
            + torch.sin(x) * torch.cos(x) + torch.tanh(x) + torch.relu(x) ** 2,
            x.amax(dim=(2, 3)) + x.amin(dim=(2, 3)) + x.sum(dim=(2, 3)),
            x.argmax(dim=1), torch.topk(x.flatten(1), 5, dim=1).values,
            F.softmax(x, dim=-1) * F.gelu(x, approximate="tanh"),
            F.leaky_relu(x, 0.1) + F.elu(x) + F.softplus(x) + F.hardsigmoid(x) + F.relu6(x * 4),
            x.norm(dim=1), x.permute(0, 2, 3, 1).reshape(2, -1, 8)[:, ::2],
        )


def test_assorted_torch_ops(tmp_path):
    torch.manual_seed(2)
    model = Assorted().eval()
    x = torch.randn(2, 8, 6, 10)
    idx = torch.randint(0, 10, (2, 8, 6, 4), dtype=torch.int32)
    path = convert_torch(model, (x, idx), [ct.TensorType(name="x", shape=x.shape),
                                           ct.TensorType(name="idx", shape=idx.shape, dtype=np.int32)],
                         tmp_path / "assorted.mlpackage")
    emu = MLProgramEmulator(path)
    counts = emu.op_type_counts()
    for op in ("conv", "instance_norm", "cumsum", "gather_along_axis", "pad", "stack", "tile", "topk",
               "reduce_argmax", "reduce_l2_norm", "softmax", "gelu", "select", "elu", "leaky_relu"):
        assert counts.get(op, 0) > 0, f"expected {op} in {counts}"
    out = emu.predict({"x": x.numpy(), "idx": idx.numpy()})
    with torch.no_grad():
        refs = model(x, idx.long())
    assert len(out) == len(refs)
    for (name, got), ref in zip(out.items(), refs):
        ref = ref.numpy()
        if ref.dtype.kind == "i":
            np.testing.assert_array_equal(got, ref, err_msg=name)
        else:
            assert_fp16_close(got, ref, tol=1e-2, name=name)


# --------------------------------------------------------------------------------------
# 4. MIL Builder programs for ops torch does not emit directly
# --------------------------------------------------------------------------------------

def _gelu_ref(x, mode):
    if mode == "EXACT":
        from scipy.special import erf
        return 0.5 * x * (1 + erf(x / np.sqrt(2)))
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
    return x / (1 + np.exp(-1.702 * x))


def test_mil_elementwise_ops(tmp_path):
    from scipy.special import erf

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3, 4, 5)), mb.TensorSpec(shape=(2, 3, 4, 5)),
                             mb.TensorSpec(shape=(2, 3), dtype=types.int32)],
                opset_version=ct.target.iOS18)
    def prog(x, z, i):
        return (
            mb.band_part(x=x, lower=1, upper=0),
            mb.l2_norm(x=x, epsilon=1e-6),
            mb.threshold(x=x, alpha=0.1),
            mb.inverse(x=mb.abs(x=x), epsilon=0.5),
            mb.rsqrt(x=mb.abs(x=x), epsilon=0.25),
            mb.log(x=mb.abs(x=x), epsilon=0.125),
            mb.one_hot(indices=i, one_hot_vector_size=6, axis=-1, on_value=2.0, off_value=-1.0),
            mb.cumsum(x=x, axis=3, exclusive=True, reverse=True),
            mb.floor(x=z), mb.ceil(x=z), mb.round(x=z), mb.sign(x=z),
            mb.mod(x=z, y=2.0), mb.floor_div(x=z, y=2.0), mb.real_div(x=z, y=4.0),
            mb.pow(x=mb.abs(x=x), y=1.5), mb.maximum(x=x, y=z), mb.minimum(x=x, y=z),
            mb.square(x=x), mb.exp2(x=x), mb.erf(x=x), mb.sinh(x=x), mb.atan(x=x),
            mb.gelu(x=x, mode="EXACT"), mb.gelu(x=x, mode="TANH_APPROXIMATION"),
            mb.gelu(x=x, mode="SIGMOID_APPROXIMATION"),
            mb.clip(x=x, alpha=-0.3, beta=0.4), mb.sigmoid_hard(x=x, alpha=0.2, beta=0.5),
            mb.softsign(x=x), mb.scaled_tanh(x=x, alpha=1.5, beta=0.5),
            mb.select(cond=mb.logical_xor(x=mb.greater(x=x, y=z), y=mb.less_equal(x=z, y=0.0)), a=x, b=z),
            mb.cast(x=mb.logical_or(x=mb.equal(x=i, y=2), y=mb.logical_not(x=mb.not_equal(x=i, y=3))),
                    dtype="int32"),
            mb.cast(x=mb.mul(x=x, y=4.0), dtype="int32"),
        )

    path = convert_mil(prog, tmp_path / "elementwise.mlpackage")
    emu = MLProgramEmulator(path)
    counts = emu.op_type_counts()
    for op in ("band_part", "l2_norm", "threshold", "inverse", "rsqrt", "log", "one_hot", "cumsum",
               "mod", "floor_div", "gelu", "clip", "logical_xor", "logical_or", "logical_not", "select"):
        assert counts.get(op, 0) > 0, f"expected {op} in {counts}"
    rng = np.random.RandomState(0)
    x = f16(rng.randn(2, 3, 4, 5))
    z = rng.choice([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 2.25, -0.75, 3.0], size=(2, 3, 4, 5)).astype(np.float32)
    i = rng.randint(0, 6, (2, 3)).astype(np.int32)
    out = list(emu.predict({"x": x, "z": z, "i": i}).values())
    xd = x.astype(np.float64)
    m, n = np.arange(4)[:, None], np.arange(5)[None, :]
    cs = np.flip(np.cumsum(np.flip(xd, 3), 3), 3) - xd
    refs = [
        np.where(((m - n) <= 1) & ((n - m) <= 0), xd, 0),
        xd / np.sqrt((xd ** 2).reshape(2, -1).sum(1) + 1e-6)[:, None, None, None],
        np.maximum(xd, 0.1), 1 / (np.abs(xd) + 0.5), 1 / np.sqrt(np.abs(xd) + 0.25), np.log(np.abs(xd) + 0.125),
        np.where(i[..., None] == np.arange(6), 2.0, -1.0), cs,
        np.floor(z), np.ceil(z), np.round(z), np.sign(z), np.mod(z, 2), np.floor_divide(z, 2), z / 4,
        np.abs(xd) ** 1.5, np.maximum(xd, z), np.minimum(xd, z), xd ** 2, 2 ** xd, erf(xd), np.sinh(xd),
        np.arctan(xd), _gelu_ref(xd, "EXACT"), _gelu_ref(xd, "TANH_APPROXIMATION"),
        _gelu_ref(xd, "SIGMOID_APPROXIMATION"), np.clip(xd, -0.3, 0.4), np.clip(0.2 * xd + 0.5, 0, 1),
        xd / (1 + np.abs(xd)), 1.5 * np.tanh(0.5 * xd),
        np.where((xd > z) ^ (z <= 0), xd, z), ((i == 2) | ~(i != 3)).astype(np.int32),
        np.trunc(f16(xd * 4)).astype(np.int32),
    ]
    assert len(out) == len(refs)
    for k, (got, ref) in enumerate(zip(out, refs)):
        if np.asarray(ref).dtype.kind in "iub":
            np.testing.assert_array_equal(got, ref, err_msg=f"output {k}")
        else:
            assert_fp16_close(got, ref, tol=4e-3, name=f"output {k} ({emu.output_names[k]})")


def test_mil_data_movement_and_reduction_ops(tmp_path):
    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 4, 6)), mb.TensorSpec(shape=(2, 3), dtype=types.int32),
                             mb.TensorSpec(shape=(3, 2), dtype=types.int32)],
                opset_version=ct.target.iOS18)
    def prog(x, bi, nd):
        idx1 = mb.slice_by_index(x=bi, begin=[0, 0], end=[1, 3], squeeze_mask=[True, False])  # (3,)
        split_a, split_b = mb.split(x=x, split_sizes=[2, 4], axis=2)
        vals, inds = mb.topk(x=x, k=3, axis=-1, ascending=True)
        return (
            mb.gather(x=x, indices=idx1, axis=2),
            mb.gather(x=x, indices=bi, axis=2, batch_dims=1),
            mb.gather_along_axis(x=x, indices=mb.tile(x=mb.expand_dims(x=bi, axes=[1]), reps=[1, 4, 1]), axis=2),
            mb.gather_nd(x=x, indices=nd),
            mb.scatter(data=x, indices=idx1, updates=mb.mul(x=mb.gather(x=x, indices=idx1, axis=2), y=2.0),
                       axis=2, mode="add"),
            mb.scatter_along_axis(data=x, indices=mb.tile(x=mb.expand_dims(x=bi, axes=[1]), reps=[1, 4, 1]),
                                  updates=mb.slice_by_size(x=x, begin=[0, 0, 0], size=[-1, -1, 3]), axis=2,
                                  mode="update"),
            mb.scatter_nd(data=x, indices=nd, updates=mb.fill_like(ref_tensor=mb.gather_nd(x=x, indices=nd),
                                                                   value=7.0), mode="update"),
            mb.slice_by_index(x=x, begin=[1, 0, 5], end=[0, 3, 0], stride=[1, 2, -2],
                              begin_mask=[False, True, False], end_mask=[True, False, True]),
            mb.slice_by_size(x=x, begin=[0, 1, 2], size=[2, 2, -1]),
            split_a, split_b,
            mb.concat(values=[x, mb.mul(x=x, y=-1.0)], axis=1, interleave=True),
            mb.stack(values=[x, x], axis=-1),
            mb.reverse(x=x, axes=[1, 2]),
            mb.transpose(x=x, perm=[2, 0, 1]),
            mb.reshape(x=x, shape=[0, -1, 3]),
            mb.squeeze(x=mb.expand_dims(x=x, axes=[0, -1]), axes=[0]),
            mb.pad(x=x, pad=[1, 1, 2, 0], mode="reflect"),
            mb.pad(x=x, pad=[0, 0, 0, 2, 1, 1], mode="replicate"),
            mb.pad(x=x, pad=[1, 1], mode="constant", constant_val=3.0),
            vals, inds,
            mb.argsort(x=x, axis=1, ascending=False),
            mb.reduce_sum_square(x=x, axes=[2], keep_dims=True),
            mb.reduce_l2_norm(x=x, axes=[1]),
            mb.reduce_l1_norm(x=x, axes=[0, 2]),
            mb.reduce_log_sum_exp(x=x, axes=[-1]),
            mb.reduce_prod(x=mb.add(x=mb.mul(x=x, y=0.1), y=1.0), axes=[2]),
            mb.reduce_mean(x=x, axes=None, keep_dims=False),
            mb.reduce_argmin(x=x, axis=1, keep_dims=True),
            mb.matmul(x=x, y=x, transpose_x=True, transpose_y=False),
            mb.matmul(x=x, y=x, transpose_x=False, transpose_y=True),
            mb.linear(x=x, weight=np.linspace(-1, 1, 30).reshape(5, 6).astype(np.float32),
                      bias=np.arange(5, dtype=np.float32)),
            mb.einsum(values=(x, mb.transpose(x=x, perm=[2, 1, 0])), equation="chw,whu->chu"),
            mb.sliding_windows(x=x, axis=2, size=3, stride=2),
            mb.layer_norm(x=x, axes=[-1], gamma=np.linspace(0.5, 1.5, 6).astype(np.float32),
                          beta=np.linspace(-1, 1, 6).astype(np.float32), epsilon=1e-5),
            mb.batch_norm(x=x, mean=np.array([0.1, -0.2, 0.3, 0.0], np.float32),
                          variance=np.array([1.0, 2.0, 0.5, 1.5], np.float32),
                          gamma=np.array([1.0, 0.5, 2.0, -1.0], np.float32),
                          beta=np.array([0.0, 1.0, -1.0, 0.5], np.float32), epsilon=1e-3),
            mb.softmax(x=x, axis=0),
            mb.flatten2d(x=x, axis=2),
        )

    path = convert_mil(prog, tmp_path / "movement.mlpackage")
    emu = MLProgramEmulator(path)
    counts = emu.op_type_counts()
    for op in ("gather", "gather_along_axis", "gather_nd", "scatter", "scatter_along_axis", "scatter_nd",
               "slice_by_index", "slice_by_size", "split", "concat", "stack", "reverse", "pad", "topk",
               "argsort", "reduce_log_sum_exp", "reduce_prod", "matmul", "linear", "einsum",
               "sliding_windows", "layer_norm", "batch_norm", "softmax"):
        assert counts.get(op, 0) > 0, f"expected {op} in {counts}"
    rng = np.random.RandomState(1)
    x = f16(rng.randn(2, 4, 6))
    bi = rng.randint(-6, 6, (2, 3)).astype(np.int32)
    bi[0] = [5, 0, 3]  # distinct non-negative row: used as scatter indices
    nd = np.array([[0, 1], [1, 3], [1, 0]], np.int32)
    out = list(emu.predict({"x": x, "bi": bi, "nd": nd}).values())
    xd = x.astype(np.float64)
    idx1 = bi[0]
    b2 = np.where(bi < 0, bi + 6, bi)
    tiled = np.tile(b2[:, None, :], (1, 4, 1))
    sc = xd.copy()
    sc[:, :, idx1] += 2 * xd[:, :, idx1]
    sa = xd.copy()
    np.put_along_axis(sa, tiled, xd[:, :, :3], axis=2)
    snd = xd.copy()
    snd[nd[:, 0], nd[:, 1]] = 7.0
    inter = np.stack([xd, -xd], axis=2).reshape(2, 8, 6)
    order = np.argsort(xd, axis=-1, kind="stable")[..., :3]
    lse = np.log(np.exp(xd).sum(-1))
    ln = (xd - xd.mean(-1, keepdims=True)) / np.sqrt(xd.var(-1, keepdims=True) + 1e-5)
    ln = ln * np.linspace(0.5, 1.5, 6) + np.linspace(-1, 1, 6)
    bn_m, bn_v = np.array([0.1, -0.2, 0.3, 0.0]), np.array([1.0, 2.0, 0.5, 1.5])
    bn = (xd - bn_m[:, None]) / np.sqrt(bn_v[:, None] + 1e-3) * np.array([1, 0.5, 2, -1.0])[:, None] \
        + np.array([0, 1, -1, 0.5])[:, None]
    sw = np.stack([xd[:, :, 0:3], xd[:, :, 2:5]], axis=2)
    e0 = np.exp(xd - xd.max(0))
    refs = [
        xd[:, :, idx1], np.stack([xd[j][:, b2[j]] for j in range(2)]), np.take_along_axis(xd, tiled, 2),
        xd[nd[:, 0], nd[:, 1]], sc, sa, snd,
        xd[1:, :3:2, 5::-2], xd[:, 1:3, 2:], xd[:, :, :2], xd[:, :, 2:], inter, np.stack([xd, xd], -1),
        xd[:, ::-1, ::-1], xd.transpose(2, 0, 1), xd.reshape(2, -1, 3), xd[..., None],
        np.pad(xd, [(0, 0), (1, 1), (2, 0)], mode="reflect"),
        np.pad(xd, [(0, 0), (0, 2), (1, 1)], mode="edge"),
        np.pad(xd, [(0, 0), (0, 0), (1, 1)], constant_values=3.0),
        np.take_along_axis(xd, order, -1), order, np.argsort(-xd, axis=1, kind="stable"),
        (xd ** 2).sum(2, keepdims=True), np.sqrt((xd ** 2).sum(1)), np.abs(xd).sum((0, 2)), lse,
        np.prod(f16(f16(xd * 0.1) + 1.0).astype(np.float64), axis=2), xd.mean(),
        np.argmin(xd, axis=1)[:, None, :],
        xd.transpose(0, 2, 1) @ xd, xd @ xd.transpose(0, 2, 1),
        xd @ np.linspace(-1, 1, 30).reshape(5, 6).T + np.arange(5), np.einsum("chw,whu->chu", xd, xd.transpose(2, 1, 0)),
        sw, ln, bn, e0 / e0.sum(0), xd.reshape(8, 6),
    ]
    assert len(out) == len(refs)
    for k, (got, ref) in enumerate(zip(out, refs)):
        ref = np.asarray(ref)
        if ref.dtype.kind in "iub":
            np.testing.assert_array_equal(got, ref, err_msg=f"output {k} ({emu.output_names[k]})")
        else:
            assert_fp16_close(got, ref, tol=4e-3, name=f"output {k} ({emu.output_names[k]})")


def test_dynamic_shape_ops_with_range_dim(tmp_path):
    from coremltools.converters.mil.mil import get_new_symbol

    @mb.program(input_specs=[mb.TensorSpec(shape=(get_new_symbol(), 4))], opset_version=ct.target.iOS18)
    def prog(x):
        shp = mb.shape(x=x)
        rows = mb.gather(x=shp, indices=0, axis=0)
        return (
            mb.range_1d(start=0, end=rows, step=1),
            mb.add(x=x, y=mb.fill(shape=shp, value=2.5)),
            mb.reshape(x=x, shape=mb.concat(values=[mb.mul(x=rows, y=2), 2], axis=0)),
            mb.fill_like(ref_tensor=x, value=1.0),
        )

    ml = _quiet_convert(prog, convert_to="mlprogram", compute_precision=FP16,
                        minimum_deployment_target=ct.target.macOS15,
                        inputs=[ct.TensorType(name="x", shape=(ct.RangeDim(1, 10, default=3), 4))])
    path = str(tmp_path / "dynamic.mlpackage")
    ml.save(path)
    emu = MLProgramEmulator(path)
    assert emu.input_specs()["x"]["shape_range"] == [(1, 10), (4, 4)]
    assert {"shape", "range_1d", "fill", "fill_like", "reshape"} <= set(emu.op_type_counts())
    for n in (1, 7):
        x = f16(np.random.RandomState(n).randn(n, 4))
        r, y, z, ones = emu.predict({"x": x}).values()
        np.testing.assert_array_equal(r, np.arange(n))
        assert_fp16_close(y, x + 2.5, tol=2e-3)
        np.testing.assert_array_equal(z, x.reshape(2 * n, 2))
        np.testing.assert_array_equal(ones, np.ones((n, 4)))
    with pytest.raises(ValueError, match=r"x has shape \(11, 4\)"):
        emu.predict({"x": np.ones((11, 4), np.float32)})


# --------------------------------------------------------------------------------------
# 5. float16 rounding, overflow and pessimistic mode
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def numerics_pkg(tmp_path_factory):
    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 64, 1, 8)), mb.TensorSpec(shape=(2, 300))],
                opset_version=ct.target.iOS18)
    def prog(x, s):
        big = mb.mul(x=s, y=300.0, name="times_300")
        return (
            mb.layer_norm(x=x, axes=[1], epsilon=1e-5, name="ln"),
            mb.softmax(x=s, axis=-1, name="sm"),
            mb.reduce_sum(x=s, axes=[-1], name="rs"),
            big,
        )

    return convert_mil(prog, tmp_path_factory.mktemp("num") / "numerics.mlpackage")


def _ln_ref(x):
    x = x.astype(np.float64)
    zm = x - x.mean(1, keepdims=True)
    return zm / np.sqrt((zm ** 2).mean(1, keepdims=True) + 1e-5)


def test_float16_overflow_becomes_inf_and_is_observed(numerics_pkg):
    emu = MLProgramEmulator(numerics_pkg)
    x = np.random.RandomState(0).randn(1, 64, 1, 8).astype(np.float32)
    s = np.full((2, 300), 300.0, np.float32)  # 300 * 300 = 90000 > 65504
    s[1] = 0.5
    seen = {}

    def observe(name, op_type, value):
        if value.dtype.kind == "f":
            seen[name] = (op_type, float(np.max(np.abs(value[np.isfinite(value)]), initial=0)),
                          int(np.sum(~np.isfinite(value))))

    out = emu.predict({"x": x, "s": s}, observe=observe)
    (mul_name,) = [n for n in seen if n.startswith("times_300")]  # coremltools appends "_cast_fp16"
    assert seen[mul_name][0] == "mul"
    assert seen[mul_name][2] == 300  # the first row overflowed to inf
    big = out[emu.output_names[3]]
    assert np.all(np.isposinf(big[0])) and np.all(big[1] == 150.0)
    # float32 outputs are exactly float16-representable
    for v in out.values():
        np.testing.assert_array_equal(v, f16(v))


def test_pessimistic_layer_norm_overflows_where_normal_mode_does_not(numerics_pkg):
    rng = np.random.RandomState(1)
    x = (3e4 + 300 * rng.randn(1, 64, 1, 8)).astype(np.float32)
    x[:, ::2] *= -1  # large +-3e4 values: the squares overflow float16
    s = rng.randn(2, 300).astype(np.float32)
    normal = MLProgramEmulator(numerics_pkg).predict({"x": x, "s": s})
    ln = normal[MLProgramEmulator(numerics_pkg).output_names[0]]
    assert np.all(np.isfinite(ln))
    assert_fp16_close(ln, _ln_ref(f16(x)), tol=1e-2, name="normal-mode layer_norm")

    pess_emu = MLProgramEmulator(numerics_pkg, pessimistic=True)
    bad_ops = set()
    pess = pess_emu.predict({"x": x, "s": s},
                            observe=lambda n, t, v: bad_ops.add(t) if not np.all(np.isfinite(v)) else None)
    assert not np.all(np.isfinite(pess[pess_emu.output_names[0]]))
    assert "layer_norm" in bad_ops
    # ordinary-sized inputs stay accurate in pessimistic mode
    y = rng.randn(1, 64, 1, 8).astype(np.float32)
    ok = pess_emu.predict({"x": y, "s": s})[pess_emu.output_names[0]]
    assert_fp16_close(ok, _ln_ref(f16(y)), tol=2e-2, name="pessimistic layer_norm")


def test_pessimistic_softmax_and_reduce_sum(numerics_pkg):
    rng = np.random.RandomState(2)
    x = rng.randn(1, 64, 1, 8).astype(np.float32)
    s = (4 * rng.randn(2, 300)).astype(np.float32)
    emu = MLProgramEmulator(numerics_pkg, pessimistic=True)
    out = emu.predict({"x": x, "s": s})
    sm = out[emu.output_names[1]]
    assert np.all(np.isfinite(sm))
    np.testing.assert_allclose(sm.sum(-1), 1.0, atol=1e-2)
    e = np.exp(f16(s).astype(np.float64) - f16(s).max(-1, keepdims=True))
    assert_fp16_close(sm, e / e.sum(-1, keepdims=True), tol=1e-2, name="pessimistic softmax")
    assert_fp16_close(out[emu.output_names[2]], f16(s).astype(np.float64).sum(-1), tol=1e-2,
                      name="pessimistic reduce_sum")
    # a float16 accumulator overflows where the float32 one does not
    s_big = np.full((2, 300), 400.0, np.float32)  # sum 120000 > 65504
    assert np.all(np.isinf(emu.predict({"x": x, "s": s_big})[emu.output_names[2]]))
    normal = MLProgramEmulator(numerics_pkg).predict({"x": x, "s": s_big})
    assert np.all(np.isinf(normal[emu.output_names[2]]))  # the result itself exceeds float16 too
    s_mid = np.full((2, 300), 200.0, np.float32)
    s_mid[:, 150:] = -200.0  # partial sums reach 30000+, the total is 0
    assert np.all(emu.predict({"x": x, "s": s_mid})[emu.output_names[2]] == 0)


# --------------------------------------------------------------------------------------
# 6. Compressed weights (constexpr ops), iOS16 and iOS18 flavours
# --------------------------------------------------------------------------------------

def _materialized_weights(path):
    """Weight tensors as decompressed by coremltools itself (constexpr output name -> array)."""
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    spec = ct.utils.load_spec(path)
    prog = milproto_load(spec, spec.specificationVersion, str(Path(path) / "Data/com.apple.CoreML/weights"))
    out = {}
    for op in prog.functions["main"].operations:
        if op.op_type.startswith("constexpr_"):
            v = op.materialized_val_inference()
            out[op.outputs[-1].name] = v[-1] if isinstance(v, tuple) else v
        elif op.op_type == "linear":
            out.setdefault("_linears", []).append(
                (op.weight.name, op.weight.val, None if op.bias is None else op.bias.val))
    return out


def _compressed_reference(path, x):
    w = _materialized_weights(path)
    h = x.astype(np.float64)
    for k, (wname, wval, bias) in enumerate(w["_linears"]):
        weight = w.get(wname, wval)
        h = f16(h @ np.asarray(weight, np.float64).T + (0 if bias is None else bias)).astype(np.float64)
        if k == 0:
            h = np.maximum(h, 0)
    return h


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 32)).eval()
    x = torch.randn(4, 64)
    return model, x


def _compress(mlp, target, how):
    import coremltools.optimize.coreml as cto

    model, x = mlp
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, x)
    ml = _quiet_convert(traced, inputs=[ct.TensorType(name="x", shape=x.shape)], convert_to="mlprogram",
                        compute_precision=FP16, minimum_deployment_target=target)
    cfg = cto.OptimizationConfig
    prune = lambda m: cto.prune_weights(m, cfg(global_config=cto.OpMagnitudePrunerConfig(  # noqa: E731
        target_sparsity=0.5, weight_threshold=0)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if how == "linear8":
            return cto.linear_quantize_weights(ml, cfg(global_config=cto.OpLinearQuantizerConfig(
                mode="linear", weight_threshold=0)))
        if how == "int4_blockwise":
            return cto.linear_quantize_weights(ml, cfg(global_config=cto.OpLinearQuantizerConfig(
                mode="linear", dtype="int4", granularity="per_block", block_size=16,
                weight_threshold=0)))
        if how == "palettize4":
            return cto.palettize_weights(ml, cfg(global_config=cto.OpPalettizerConfig(
                nbits=4, mode="uniform", weight_threshold=0)))
        if how == "palettize2_grouped":
            return cto.palettize_weights(ml, cfg(global_config=cto.OpPalettizerConfig(
                nbits=2, mode="uniform", granularity="per_grouped_channel", group_size=8, weight_threshold=0)))
        if how == "prune":
            return prune(ml)
        if how == "prune+palettize":
            return cto.palettize_weights(prune(ml), cfg(global_config=cto.OpPalettizerConfig(
                nbits=4, mode="uniform", weight_threshold=0)), joint_compression=True)
        if how == "prune+quantize":
            return cto.linear_quantize_weights(prune(ml), cfg(global_config=cto.OpLinearQuantizerConfig(
                mode="linear_symmetric", weight_threshold=0)), joint_compression=True)
    raise AssertionError(how)


@pytest.mark.parametrize("target,how,expected_ops", [
    (ct.target.iOS16, "linear8", {"constexpr_affine_dequantize"}),
    (ct.target.iOS16, "palettize4", {"constexpr_lut_to_dense"}),
    (ct.target.iOS16, "prune", {"constexpr_sparse_to_dense"}),
    (ct.target.macOS15, "int4_blockwise", {"constexpr_blockwise_shift_scale"}),
    (ct.target.macOS15, "palettize2_grouped", {"constexpr_lut_to_dense"}),
    (ct.target.macOS15, "prune+palettize", {"constexpr_lut_to_sparse", "constexpr_sparse_to_dense"}),
    (ct.target.macOS15, "prune+quantize", {"constexpr_sparse_blockwise_shift_scale", "constexpr_sparse_to_dense"}),
])
def test_compressed_weights_match_coremltools_decompression(mlp, tmp_path, target, how, expected_ops):
    path = str(tmp_path / f"{how}.mlpackage")
    _compress(mlp, target, how).save(path)
    emu = MLProgramEmulator(path)
    assert expected_ops <= set(emu.op_type_counts()), emu.op_type_counts()
    x = mlp[1].numpy()
    (got,) = emu.predict({"x": x}).values()
    assert_fp16_close(got, _compressed_reference(path, f16(x)), tol=5e-3, name=how)


@pytest.mark.parametrize("rows,cols", [(4, 6), (2, 3)])  # (2, 3): sub-byte values stored inline, not in weight.bin
def test_vector_lut_and_int4_shift_scale_match_coremltools(tmp_path, rows, cols):
    from coremltools.converters.mil.mil.ops.defs.iOS18.compression import (
        constexpr_blockwise_shift_scale,
        constexpr_lut_to_dense,
    )

    rng = np.random.RandomState(4)
    indices = rng.randint(0, 4, (rows, cols)).astype(types.np_uint2_dtype)
    lut = rng.randn(2, 1, 4, 2).astype(np.float16)  # 2 row blocks, 1 column block, 4 entries, vectors of 2
    q = rng.randint(-8, 8, (rows, cols)).astype(types.np_int4_dtype)
    scale = (0.1 + rng.rand(rows, 1)).astype(np.float16)
    offset = rng.randint(-2, 3, (rows, 1)).astype(types.np_int4_dtype)

    @mb.program(input_specs=[mb.TensorSpec(shape=(3, cols))], opset_version=ct.target.iOS18)
    def prog(x):
        w_lut = mb.constexpr_lut_to_dense(indices=indices, lut=lut, vector_axis=0)  # (2 * rows, cols)
        w_q = mb.constexpr_blockwise_shift_scale(data=q, scale=scale, offset=offset)  # (rows, cols)
        return mb.linear(x=x, weight=w_lut), mb.linear(x=x, weight=w_q)

    path = convert_mil(prog, tmp_path / "inline.mlpackage")
    emu = MLProgramEmulator(path)
    assert {"constexpr_lut_to_dense", "constexpr_blockwise_shift_scale"} <= set(emu.op_type_counts())
    x = f16(rng.randn(3, cols))
    dense_lut = constexpr_lut_to_dense.decompress(indices, lut, 0).astype(np.float64)
    dense_q = constexpr_blockwise_shift_scale.decompress(q, scale, offset).astype(np.float64)
    assert dense_lut.shape == (2 * rows, cols)
    got_lut, got_q = emu.predict({"x": x}).values()
    assert_fp16_close(got_lut, x @ dense_lut.T, tol=4e-3, name="vector lut")
    assert_fp16_close(got_q, x @ dense_q.T, tol=4e-3, name="int4 shift/scale")


def test_multifunction_package_selects_function(mlp, numerics_pkg, tmp_path):
    model, x = mlp
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, x)
    mlp_path = str(tmp_path / "mlp.mlpackage")
    _quiet_convert(traced, inputs=[ct.TensorType(name="x", shape=x.shape)], convert_to="mlprogram",
                   compute_precision=FP16, minimum_deployment_target=ct.target.macOS15).save(mlp_path)
    desc = ct.utils.MultiFunctionDescriptor()
    desc.add_function(mlp_path, "main", "mlp")
    desc.add_function(numerics_pkg, "main", "numerics")
    desc.default_function_name = "mlp"
    multi = str(tmp_path / "multi.mlpackage")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ct.utils.save_multifunction(desc, multi)

    default = MLProgramEmulator(multi)  # "main" falls back to the default function
    assert default.function_name == "mlp" and default.input_names == ["x"]
    assert default.input_specs()["x"]["shape"] == (4, 64)
    (got,) = default.predict({"x": x.numpy()}).values()
    with torch.no_grad():
        assert_fp16_close(got, model(x).numpy(), tol=1e-2, name="multifunction mlp")
    other = MLProgramEmulator(multi, function_name="numerics")
    assert other.input_names == ["x", "s"]
    assert other.input_specs()["s"]["shape"] == (2, 300)
    assert "layer_norm" in other.op_type_counts()


def test_fast_float16_rounding_is_bit_exact():
    rng = np.random.RandomState(5)
    x = (rng.randn(200000) * 10.0 ** rng.randint(-12, 8, 200000)).astype(np.float32)
    edge = np.array([65504, 65519.99, 65520, 65536, -65520, 1e9, np.inf, -np.inf, np.nan, 2.0 ** -24,
                     2.0 ** -25, 3 * 2.0 ** -26, 2.0 ** -14, 2.0 ** -14 * (1 - 2.0 ** -12), 1e-8, 0.0, -0.0,
                     1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11], np.float32)
    x = np.concatenate([x, edge, -edge])
    with np.errstate(all="ignore"):
        expected = x.astype(np.float16).astype(np.float32)
    got = emu_mod.numerics.f16(x)
    np.testing.assert_array_equal(got, expected)
    assert np.array_equal(np.signbit(got), np.signbit(expected))
    assert emu_mod.numerics.f16(np.float32(70000.0)).shape == ()


def test_required_op_types_are_supported():
    required = """const conv linear matmul einsum add sub mul real_div floor_div pow maximum minimum mod abs sqrt
        rsqrt inverse exp log sin cos tanh erf sigmoid relu gelu silu softmax layer_norm l2_norm reduce_mean
        reduce_sum reduce_max reduce_min reduce_prod reduce_l2_norm reduce_sum_square reduce_argmax clip select
        greater greater_equal less less_equal equal not_equal logical_and logical_or logical_not logical_xor cast
        gather gather_nd gather_along_axis scatter concat split slice_by_index slice_by_size reshape expand_dims
        squeeze transpose tile range_1d shape fill fill_like identity cumsum band_part topk one_hot pad stack sign
        round floor ceil square threshold batch_norm instance_norm scaled_dot_product_attention
        constexpr_affine_dequantize constexpr_lut_to_dense constexpr_sparse_to_dense
        constexpr_blockwise_shift_scale constexpr_cast""".split()
    missing = set(required) - set(emu_mod.supported_op_types())
    assert not missing


def test_quantize_dequantize_by_hand(tmp_path):
    """iOS 17 activation quantization: x / scale rounded half to even, zero point added, clipped to the dtype's
    range; dequantize = scale * (q - zero point). Per tensor (int8) and per channel (uint8, zero points)."""
    @mb.program(input_specs=[mb.TensorSpec(shape=(8,), dtype=types.fp16),
                             mb.TensorSpec(shape=(1, 2, 4), dtype=types.fp16)], opset_version=ct.target.iOS17)
    def prog(x, y):
        qx = mb.quantize(input=x, scale=np.float16(0.5), output_dtype="int8")
        scale, zp = np.array([0.5, 0.25], np.float16), np.array([128, 10], np.uint8)
        qy = mb.quantize(input=y, scale=scale, zero_point=zp, axis=1, output_dtype="uint8")
        return (mb.cast(x=qx, dtype="int32"), mb.dequantize(input=qx, scale=np.float16(0.5)),
                mb.dequantize(input=qy, scale=scale, zero_point=zp, axis=1))

    path = convert_mil(prog, tmp_path / "quant.mlpackage", target=ct.target.iOS17)
    x = np.array([1.25, 1.75, -1.25, 0.75, 100.0, -100.0, 0.0, 0.2], np.float32)      # x / 0.5: ties, clips
    y = np.array([[[1.25, -1.0, 70.0, 0.3], [0.375, -5.0, 1.0, 0.125]]], np.float32)
    for pessimistic in (False, True):
        emu = MLProgramEmulator(path, pessimistic=pessimistic)
        assert {"quantize", "dequantize"} <= set(emu.op_type_counts())
        q, dx, dy = emu.predict({"x": x, "y": y}).values()
        np.testing.assert_array_equal(q, [2, 4, -2, 2, 127, -128, 0, 0])
        np.testing.assert_array_equal(dx, [1.0, 2.0, -1.0, 1.0, 63.5, -64.0, 0.0, 0.0])
        # channel 0: rint(y/0.5) + 128 -> [130, 126, 255 (268 clipped), 129]; channel 1: rint(y/0.25) + 10 ->
        # [12 (1.5 -> 2), 0 (-10 clipped), 14, 10 (0.5 -> 0)]
        np.testing.assert_array_equal(dy, [[[1.0, -1.0, 63.5, 0.5], [0.5, -2.5, 1.0, 0.0]]])


# --------------------------------------------------------------------------------------
# 7. Errors
# --------------------------------------------------------------------------------------

def test_unsupported_op_names_type_and_op(tmp_path):
    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 2, 8, 8))], opset_version=ct.target.iOS18)
    def prog(x):
        return mb.avg_pool(x=x, kernel_sizes=[2, 2], strides=[2, 2], pad_type="valid", name="my_pool")

    path = convert_mil(prog, tmp_path / "pool.mlpackage")
    with pytest.raises(UnsupportedOpError) as e:
        MLProgramEmulator(path)
    msg = str(e.value)
    assert "avg_pool" in msg and "my_pool" in msg and "\n" not in msg


def test_not_an_mlpackage(tmp_path):
    with pytest.raises(NotAnMLPackageError) as e:
        MLProgramEmulator(tmp_path / "missing.mlpackage")
    assert "missing.mlpackage" in str(e.value) and "\n" not in str(e.value)
    empty = tmp_path / "empty.mlpackage"
    empty.mkdir()
    with pytest.raises(NotAnMLPackageError) as e:
        MLProgramEmulator(empty)
    assert "\n" not in str(e.value)
    plain = tmp_path / "file.txt"
    plain.write_text("hello")
    with pytest.raises(NotAnMLPackageError):
        MLProgramEmulator(plain)
    assert issubclass(NotAnMLPackageError, ValueError)
