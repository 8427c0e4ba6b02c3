"""coreml/cost.py: FLOP and byte counts of saved packages against counts worked out by hand from the config."""
import pytest

from modernbert_ane import convert
from modernbert_ane.coreml import cost as package_cost
from checkpoints import CONFIGS
from modernbert_ane.coreml.package import read_metadata
from modernbert_ane.user_errors import run_cli

CFG = CONFIGS["tiny"]
C, I, L, H = CFG["hidden_size"], CFG["intermediate_size"], CFG["num_hidden_layers"], CFG["num_attention_heads"]
D = C // H                                                     # head_dim


def vocab(folder) -> int:
    import json
    return json.loads((folder / "config.json").read_text())["vocab_size"]


def expected(S: int, V: int) -> dict:
    """A fill-mask package of the tiny config at S tokens, masked (S x S) attention, Hadamard rotation."""
    per_layer = 2 * S * (3 * C * C + C * C + 2 * I * C + C * I)        # Wqkv, Wo, Wi (input and gate), mlp Wo
    conv = (L * per_layer
            + 2 * (2 * S * C * C + S * C)                              # the rotation's two C x C convs, with bias
            + 2 * S * C * C                                            # head dense (no bias in tiny)
            + 2 * S * V * C + S * V)                                   # tied decoder, with bias
    conv_weight_elems = L * (3 * C * C + C * C + 2 * I * C + C * I) + 2 * (C * C + C) + C * C + V * C + V
    return {"conv": conv,
            "matmul": L * H * 2 * (2 * S * S * D),                     # scores q.k and weights.v, per head
            "softmax": L * H * S * S * 5,
            "conv_weight_bytes": 2 * conv_weight_elems,                 # float16
            "largest_bytes": 2 * V * S}                                 # the logits


@pytest.fixture(scope="module")
def tiny_packages(checkpoint_factory, tmp_path_factory):
    folder = checkpoint_factory("tiny")
    out = tmp_path_factory.mktemp("cost")
    made = {}
    for name, options in (("fixed", ["--seq-len", "32"]), ("flexible", ["--seq-len", "16", "32"]),
                          ("int8", ["--seq-len", "32", "--compress", "int8"])):
        made[name] = out / f"{name}.mlpackage"
        with pytest.raises(SystemExit) as e:
            run_cli(convert.main, [str(folder), *options, "--local-attention", "masked", "--rotation", "hadamard",
                                   "--skip-check", "-o", str(made[name])])
        assert e.value.code == 0
    return made, vocab(folder)


def check_counts(summary, costs, S, V):
    want = expected(S, V)
    for category in ("conv", "matmul", "softmax"):
        assert summary["flops_by_category"][category] == want[category], category
    conv_weights = {}
    for c in costs:
        if c.op_type == "conv":
            conv_weights.update(c.weights)
    assert sum(conv_weights.values()) == want["conv_weight_bytes"]
    assert summary["largest_activation"]["bytes"] == want["largest_bytes"]
    assert summary["flops"] == sum(summary["flops_by_category"].values())
    assert summary["flops"] == sum(c.flops for c in costs)


def test_fixed_length_package_matches_hand_counts(tiny_packages):
    packages, V = tiny_packages
    program = package_cost.Program(packages["fixed"])
    assert program.is_static() and program.static_length() == 32
    costs = package_cost.op_costs(program)
    check_counts(package_cost.summarize(costs), costs, 32, V)
    # the embedding table is read by the gather, once: V x C float16
    gather = [c for c in costs if c.op_type == "gather" and c.weights]
    assert sum(sum(c.weights.values()) for c in gather) == 2 * V * C
    decoder = next(c for c in costs if c.op_type == "conv" and c.shape[1] == V)
    assert set(gather[0].weights) <= set(decoder.weights)          # the tied decoder's own constant: stored once
    # K transposed once per layer; besides, the looked-up embeddings to (1, C, 1, S) and the logits to (1, S, V)
    assert package_cost.summarize(costs)["ops_by_type"]["transpose"] == L + 2


def test_flexible_package_counts_each_length_on_the_emulator(tiny_packages):
    packages, V = tiny_packages
    program = package_cost.Program(packages["flexible"])
    assert not program.is_static()                                 # the file leaves S unknown
    for S in (16, 32):
        costs = package_cost.op_costs(program, S)
        check_counts(package_cost.summarize(costs), costs, S, V)
    by_length = package_cost.package_costs(packages["flexible"])
    assert sorted(by_length) == [16, 32]
    assert by_length[32]["flops"] > by_length[16]["flops"]


def test_counts_are_in_the_metadata(tiny_packages):
    packages, V = tiny_packages
    for name, lengths in (("fixed", [32]), ("flexible", [16, 32])):
        cost = read_metadata(packages[name])["cost"]
        assert sorted(cost) == [str(n) for n in lengths]
        for n in lengths:
            assert cost[str(n)]["flops_by_category"]["conv"] == expected(n, V)["conv"]
            assert cost[str(n)]["weight_bytes"] > expected(n, V)["conv_weight_bytes"]   # + embeddings, RoPE...


def test_weight_bytes_are_what_the_weight_file_stores(tiny_packages):
    """Every weight read once at its stored size: the weight file's size less its per-blob headers and padding;
    an int8 package's weights count as the int8 values and their scales, not the float16 they decompress to."""
    packages, _ = tiny_packages
    read = {}
    for name in ("fixed", "int8"):
        weight_file = packages[name] / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
        read[name] = package_cost.package_costs(packages[name])[32]["weight_bytes"]
        assert 0.95 * weight_file.stat().st_size < read[name] <= weight_file.stat().st_size, name
    assert read["int8"] < 0.6 * read["fixed"]
    fixed, int8 = (package_cost.package_costs(packages[name])[32]["flops_by_category"] for name in ("fixed", "int8"))
    assert (int8["conv"], int8["matmul"]) == (fixed["conv"], fixed["matmul"])       # the same work, smaller weights


def test_einsum_flops():
    assert package_cost.einsum_flops("bchq,bkhc->bkhq", [(1, 16, 1, 32), (1, 32, 1, 16)]) == 2 * 16 * 32 * 32
    assert package_cost.einsum_flops("ab,ab->ab", [(3, 4), (3, 4)]) == 12       # nothing summed: elementwise


def test_op_flops_by_kind():
    shapes = {"x": (2, 8, 5), "y": (2, 5, 7), "out": (2, 8, 7), "xt": (2, 5, 8), "t": (), "w": (6, 3, 1, 1),
              "img": (1, 3, 1, 10), "conv_out": (1, 6, 1, 10), "b": (6,)}
    values = {"t": True}
    matmul = package_cost.Op("matmul", {"x": ["x"], "y": ["y"]}, ("out",))
    assert package_cost.op_flops(matmul, shapes.get, values.get) == 2 * 2 * 8 * 7 * 5
    transposed = package_cost.Op("matmul", {"x": ["xt"], "y": ["y"], "transpose_x": ["t"]}, ("out",))
    assert package_cost.op_flops(transposed, shapes.get, values.get) == 2 * 2 * 8 * 7 * 5
    conv = package_cost.Op("conv", {"x": ["img"], "weight": ["w"], "bias": ["b"]}, ("conv_out",))
    assert package_cost.op_flops(conv, shapes.get, values.get) == 2 * 60 * 3 + 60
    assert package_cost.op_flops(package_cost.Op("softmax", {"x": ["out"]}, ("out",)), shapes.get, values.get) == 5 * 112
    assert package_cost.op_flops(package_cost.Op("transpose", {"x": ["x"]}, ("xt",)), shapes.get, values.get) == 0
    assert package_cost.op_flops(package_cost.Op("reduce_sum_square", {"x": ["x"]}, ("t",)), shapes.get,
                                 values.get) == 2 * 80


def test_summary_counts_a_shared_weight_once():
    a = package_cost.OpCost("a", "conv", "conv", 10, {"w": 100}, 4, 8, (1, 4))
    b = package_cost.OpCost("b", "conv", "conv", 20, {"w": 100, "v": 6}, 8, 16, (1, 8))
    s = package_cost.summarize([a, b])
    assert s["weight_bytes"] == 106 and s["flops"] == 30 and s["activation_bytes_written"] == 24
    assert s["largest_activation"]["op"] == "b" and s["ops_by_type"] == {"conv": 2}
