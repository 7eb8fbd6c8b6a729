"""Quantize while loading (issue 17, item 6): ``from_pretrained(..., quantize="nf4")`` reads
one tensor at a time and quantizes it at once; the quantizer works on a concrete weight a
piece at a time with the same result as the whole; checkpoint tensors are read with plain
file reads, equal to what safetensors reads. Peak resident memory at Llama-1B's shape is
measured by benchmarks/load_quantized.py (tests/background/test_benchmarks.py runs it small)."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import save_file

import lorax
from lorax.models import hub, llama
from lorax.quant import quantizers

pytestmark = pytest.mark.fast_compile  # compile-bound: small shapes (tests/conftest.py)


@settings(max_examples=6, deadline=None)
@given(
    shape=st.sampled_from([(96, 40), (3, 33, 17), (130, 70), (7, 5, 9), (1001,), (4, 64, 10)]),
    stack=st.integers(0, 1),
    block_size=st.sampled_from([32, 64]),
    piece=st.sampled_from([8, 30]),
    double_quant=st.booleans(),
)
def test_a_concrete_weight_quantized_in_pieces_equals_the_whole(
    shape, stack, block_size, piece, double_quant
):
    """The pieces start on block boundaries (a 2-D kernel is cut along its output columns,
    PyTorch's rows): codes and scales are bit-equal to the traced, whole-weight path."""
    if stack and len(shape) < 2:
        shape = (2, *shape)
    w = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32) * 3
    whole = jax.jit(lambda w: quantizers._nf4(w, block_size, double_quant, "bfloat16", stack))
    want = whole(w)
    with pytest.MonkeyPatch.context() as patch:  # below the size of every weight drawn
        patch.setattr(quantizers, "PIECE", piece)
        for given_as in (w, jnp.asarray(w)):  # numpy (a loaded tensor) or a device array
            got = quantizers._nf4(given_as, block_size, double_quant, "bfloat16", stack)
            assert jax.tree.structure(got) == jax.tree.structure(want)
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
                np.testing.assert_array_equal(a, b)


def test_checkpoint_tensors_read_as_safetensors_reads_them(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "bf16": rng.standard_normal((4, 2)).astype(ml_dtypes.bfloat16),
        "f16": rng.standard_normal((6,)).astype(np.float16),
        "i8": rng.integers(-100, 100, (2, 3)).astype(np.int8),
        "u8": rng.integers(0, 255, (5,)).astype(np.uint8),
        "i64": rng.integers(0, 2**40, (2,)).astype(np.int64),
        "flag": np.array([True, False, True]),
        "scalar": np.array(2.5, np.float32),
        "empty": np.zeros((0, 4), np.float32),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    files = hub.TensorFiles(tmp_path)
    try:
        reference = safe_open(tmp_path / "model.safetensors", framework="numpy")
        for name in tensors:
            got, want = files.get(name), reference.get_tensor(name)
            assert got.dtype == want.dtype and got.shape == want.shape, name
            np.testing.assert_array_equal(got, want)
            assert got.flags.writeable, name  # memory of its own, not a read-only map
    finally:
        files.close()


def _checkpoint(tmp_path):
    config = llama.LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = llama.Llama(config)
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    llama.save_pretrained(tmp_path, model, params)
    return params


@pytest.mark.parametrize("scan_layers", [False, True])
def test_nf4_load_holds_the_quantized_model_and_one_weight(tmp_path, monkeypatch, scan_layers):
    """Whenever a tensor is read, the arrays alive are the model quantized so far plus the
    weight in flight (with scanned layers: the layers of one stacked weight), never the
    dense model; the result equals quantizing the dense load."""
    params = _checkpoint(tmp_path)
    dense_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    del params
    largest = 128 * 64 * 4 * (3 if scan_layers else 1)
    read, alive = hub.TensorFiles.get, []
    before = sum(x.nbytes for x in jax.live_arrays())  # what other tests keep alive

    def get(self, name):
        alive.append(sum(x.nbytes for x in jax.live_arrays()) - before)
        return read(self, name)

    monkeypatch.setattr(hub.TensorFiles, "get", get)
    _, got = llama.from_pretrained(tmp_path, scan_layers=scan_layers, quantize="nf4")
    monkeypatch.undo()
    final = sum(x.nbytes for x in jax.tree.leaves(got))
    assert final < dense_bytes / 2
    assert max(alive) <= final + 2 * largest < dense_bytes, (max(alive), final, dense_bytes)
    want = lorax.quantize(llama.from_pretrained(tmp_path, scan_layers=scan_layers)[1], "nf4")
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)
