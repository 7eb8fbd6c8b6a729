"""NF4 against an independent numpy model of docs/nf4.md; int8; QLoRA gradients and training."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import check_lora_equals_merged, fit, randomize_b

import lorax
from lorax.quant import DYNAMIC_MAP, quantize_nf4

pytestmark = pytest.mark.fast_compile  # compile-bound: small shapes (tests/conftest.py)

# ---- the reference, written from docs/nf4.md alone -------------------------------------
CODE = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)
MID = (CODE[1:] + CODE[:-1]) / np.float32(2)


def ref_nf4(w_torch_layout, block=64):
    """codes (one per value), float32 absmax per block, packed bytes, dequantized values."""
    w = np.asarray(w_torch_layout, np.float32).reshape(-1)
    n = w.size
    nb = -(-n // block)
    pad = np.zeros(nb * block, np.float32)
    pad[:n] = w
    blocks = pad.reshape(nb, block)
    absmax = np.abs(blocks).max(1)
    normed = blocks / np.where(absmax == 0, np.float32(1), absmax)[:, None]
    q = np.searchsorted(MID, normed, side="left").reshape(-1)[:n]
    qp = np.concatenate([q, [0] * (n % 2)]).astype(np.uint8)
    packed = (qp[0::2] << 4) | qp[1::2]
    deq = (CODE[q] * np.repeat(absmax, block)[:n]).astype(np.float64)
    return q, absmax, packed, deq


def ref_double_quant(absmax):
    offset = np.float32(absmax.mean(dtype=np.float64))
    c = (absmax - offset).astype(np.float32)
    nb2 = -(-c.size // 256)
    cp = np.zeros(nb2 * 256, np.float32)
    cp[: c.size] = c
    a2 = np.abs(cp.reshape(nb2, 256)).max(1)
    normed = cp.reshape(nb2, 256) / np.where(a2 == 0, np.float32(1), a2)[:, None]
    dist = np.abs(normed.reshape(-1)[:, None] - DYNAMIC_MAP[None, :].astype(np.float64))
    q = dist.argmin(1)[: c.size]  # nearest; argmin takes the first (lower) on ties
    recon = DYNAMIC_MAP[q] * np.repeat(a2, 256)[: c.size] + offset
    return q, a2, offset, recon


def _cases():
    rng = np.random.default_rng(0)
    ties = np.tile(np.concatenate([[1.0], MID, [0.0] * (63 - len(MID))]), (16, 1))
    return {
        "randn": rng.standard_normal((96, 80)),
        "odd": rng.standard_normal((33, 47)),  # partial trailing block, odd count
        "ties": ties,  # exact midpoints between levels
        "zero_huge_tiny": np.concatenate(
            [
                np.zeros((8, 64)),
                1e4 * rng.standard_normal((8, 64)),
                1e-6 * rng.standard_normal((8, 64)),
            ]
        ),
        "single_row": rng.standard_normal((1, 7)),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_codes_scales_and_values_match_reference(name):
    w_torch = _cases()[name].astype(np.float32)  # [out, in]
    kernel = jnp.asarray(w_torch.T)  # Flax [in, out]
    q, absmax, packed, deq = ref_nf4(w_torch)
    leaf = quantize_nf4(kernel, double_quant=False, compute_dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(leaf.codes), packed)
    np.testing.assert_array_equal(np.asarray(leaf.unpacked_codes()), q)
    np.testing.assert_array_equal(np.asarray(leaf.absmax), absmax)
    np.testing.assert_array_equal(
        np.asarray(leaf.materialize()).T.reshape(-1), deq.astype(np.float32)
    )
    # Double quantization: the absmax codes and second-level scales.
    dq = quantize_nf4(kernel, double_quant=True, compute_dtype=jnp.float32)
    q2, a2, offset, recon = ref_double_quant(absmax)
    np.testing.assert_array_equal(np.asarray(dq.codes), packed)
    np.testing.assert_array_equal(np.asarray(dq.absmax), q2)
    np.testing.assert_array_equal(np.asarray(dq.absmax2), a2)
    np.testing.assert_allclose(np.asarray(dq.offset), offset, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(dq.block_absmax()), recon, rtol=1e-6, atol=1e-6)


def test_dynamic_map_facts():
    assert DYNAMIC_MAP.shape == (256,) and np.all(np.diff(DYNAMIC_MAP) >= 0)
    assert DYNAMIC_MAP.max() == 1.0 and 0.0 in DYNAMIC_MAP
    np.testing.assert_allclose(DYNAMIC_MAP.min(), -0.99296874, rtol=1e-7)


def test_error_anchors_randn_1024():
    w = jax.random.normal(jax.random.key(0), (1024, 1024))
    leaf = quantize_nf4(w, 64, double_quant=False, compute_dtype=jnp.float32)
    err = jnp.abs(leaf.materialize() - w)
    mae = float(err.mean())
    rel = float((err / (jnp.abs(w) + 1e-8)).mean())
    assert abs(mae - 0.072798) <= 0.01 * 0.072798, mae
    assert abs(rel - 0.203339) <= 0.01 * 0.203339, rel


@pytest.mark.parametrize("double_quant, bits", [(True, 4.127), (False, 4.5)])
def test_bits_per_parameter_from_arrays_held(double_quant, bits):
    params = {"w": jax.random.normal(jax.random.key(0), (4096, 4096))}
    qp = lorax.quantize(params, "nf4", double_quant=double_quant)
    held = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(qp))
    assert round(8 * held / 4096**2, 3) == bits
    s = lorax.summary(qp)
    assert round(s.rows[0].bits_per_param, 3) == bits


def test_int8_per_output_channel():
    w = jax.random.normal(jax.random.key(0), (64, 32)) * jnp.linspace(0.1, 3, 32)[None, :]
    leaf = lorax.quantize({"k": w}, "int8", compute_dtype=jnp.float32)["k"]
    assert leaf.codes.dtype == jnp.int8 and leaf.scale.shape == (1, 32)
    np.testing.assert_allclose(leaf.materialize(), w, atol=float(jnp.abs(w).max()) / 127)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Dense(64, name="fc1")(x))
        return nn.Dense(4, name="fc2")(x)


def test_qlora_equals_dequantized_dense_values_and_grads():
    model = MLP()
    x = jax.random.normal(jax.random.key(0), (8, 32))
    params = jax.jit(model.init)(jax.random.key(1), x)["params"]
    qp = lorax.quantize(params, "nf4", compute_dtype=jnp.float32)
    qlp = randomize_b(lorax.wrap(qp, rank=4, key=jax.random.key(2)), jax.random.key(3))
    assert isinstance(qlp["fc1"]["kernel"].base, lorax.NF4Weight)
    check_lora_equals_merged(model.apply, {"params": qlp}, x)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + nn.Dense(32, name="proj")(nn.gelu(nn.Dense(64, name="up")(x))), None


class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
        x, _ = nn.scan(
            nn.remat(Block), variable_axes={"params": 0}, split_rngs={"params": True}, length=3
        )(name="ScanBlocks")(x, None)
        return nn.Dense(4, name="head")(x)


def test_qlora_in_scanned_stack_trains():
    model = Stack()
    x = jax.random.normal(jax.random.key(0), (64, 32))
    y = jnp.sin(x[:, :4] * 3)
    params = jax.jit(model.init)(jax.random.key(1), x)["params"]
    qp = lorax.quantize(params, "nf4")
    up = qp["ScanBlocks"]["up"]["kernel"]
    assert up.codes.shape == (3, 32 * 64 // 2) and up.shape == (3, 32, 64)
    # Exact equivalence in float32 compute; the training below computes in bf16.
    q32 = lorax.wrap(lorax.quantize(params, "nf4", compute_dtype=jnp.float32), rank=4)
    check_lora_equals_merged(model.apply, {"params": randomize_b(q32, jax.random.key(5))}, x)
    qlp = lorax.wrap(qp, rank=4, key=jax.random.key(2))

    apply = lorax.lora(model.apply, strict=True)
    trainable, frozen = lorax.split(qlp)
    loss = lambda t: jnp.mean(
        (
            apply({"params": lorax.combine(t, frozen)}, x).astype(jnp.float32)  # noqa: E731
            - y
        )
        ** 2
    )
    trainable, values = fit(loss, trainable, 60, lr=1e-2)
    assert values[-1] < 0.7 * values[0]


def test_dequantized_weight_is_not_kept_for_backward():
    """Inside lora, each NF4 use dequantizes under a checkpoint that saves nothing."""
    w = jax.random.normal(jax.random.key(0), (256, 512))
    qp = lorax.quantize({"w": w}, "nf4", compute_dtype=jnp.float32)
    x = jax.random.normal(jax.random.key(1), (4, 256))
    f = lorax.lora(lambda p, x: jnp.sum(jnp.tanh(x @ p["w"])))
    _, vjp = jax.vjp(lambda x: f(qp, x), x)
    res_shapes = [np.shape(r) for r in jax.tree.leaves(vjp)]
    assert (256, 512) not in res_shapes and (512, 256) not in res_shapes, res_shapes


def test_quantize_errors():
    params = {"w": jnp.ones((64, 64)), "b": jnp.ones(64)}
    with pytest.raises(ValueError, match="method must be"):
        lorax.quantize(params, "fp3")
    with pytest.raises(ValueError, match="block_size"):
        lorax.quantize(params, "nf4", block_size=48)
    with pytest.raises(ValueError, match="matched no adaptable weight"):
        lorax.quantize(params, "nf4", targets=r"nothing")


def test_bitsandbytes_layout_round_trip_is_exact(tmp_path):
    import json

    from safetensors.numpy import load_file, save_file

    w = jax.random.normal(jax.random.key(0), (33, 47))  # odd count, partial block
    for dq in (True, False):
        leaf = quantize_nf4(w, double_quant=dq)
        tensors = lorax.quant.nf4_to_bnb(leaf, "model.layers.0.mlp.down_proj")
        assert tensors["model.layers.0.mlp.down_proj.weight"].shape == ((33 * 47 + 1) // 2, 1)
        state = json.loads(
            bytes(
                tensors["model.layers.0.mlp.down_proj.weight.quant_state.bitsandbytes__nf4"]
            ).decode()
        )
        assert state["shape"] == [47, 33] and state["quant_type"] == "nf4"
        assert ("nested_offset" in state) == dq
        save_file(tensors, str(tmp_path / "m.safetensors"))
        back = lorax.quant.nf4_from_bnb(
            load_file(str(tmp_path / "m.safetensors")), "model.layers.0.mlp.down_proj"
        )
        for a, b in zip(jax.tree.leaves(leaf), jax.tree.leaves(back)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert back.layer_shape == leaf.layer_shape and back.compute_dtype == leaf.compute_dtype
        np.testing.assert_array_equal(
            np.asarray(back.materialize(), np.float32), np.asarray(leaf.materialize(), np.float32)
        )


def test_bitsandbytes_layout_errors():
    leaf = quantize_nf4(jax.random.normal(jax.random.key(0), (64, 32)))
    tensors = lorax.quant.nf4_to_bnb(leaf, "fc")
    with pytest.raises(KeyError, match="'gc.weight.quant_state"):
        lorax.quant.nf4_from_bnb(tensors, "gc")
    bad = dict(tensors, **{"fc.weight": tensors["fc.weight"][:-3]})
    with pytest.raises(ValueError, match="'fc'.*do not fit shape \\[32, 64\\]"):
        lorax.quant.nf4_from_bnb(bad, "fc")
    stacked = quantize_nf4(jax.random.normal(jax.random.key(0), (2, 64, 32)), stack=1)
    with pytest.raises(ValueError, match="slice stacked layers"):
        lorax.quant.nf4_to_bnb(stacked, "fc")
