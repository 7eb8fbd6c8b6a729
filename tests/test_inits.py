"""PiSSA, OLoRA and LoftQ initialisations against numpy's SVD / QR (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax

pytestmark = pytest.mark.fast_compile  # compile-bound: small shapes (tests/conftest.py)

W = jax.random.normal(jax.random.key(0), (3, 32, 48))  # three stacked layers
PARAMS = {"ScanLayers": {"kernel": W}}


def _low(leaf):
    """scale * A @ B per layer, float64."""
    a, b = np.asarray(leaf.a, np.float64), np.asarray(leaf.b, np.float64)
    return leaf.scale * a @ b


@pytest.mark.parametrize("rank,alpha", [(1, 1.0), (4, 8.0), (6, 3.0)])
def test_pissa_is_the_top_r_svd_with_residual_base(rank, alpha):
    leaf = lorax.wrap(PARAMS, rank=rank, alpha=alpha, init="pissa")["ScanLayers"]["kernel"]
    for layer in range(3):
        u, s, vt = np.linalg.svd(np.asarray(W[layer], np.float64))
        top = (u[:, :rank] * s[:rank]) @ vt[:rank]
        np.testing.assert_allclose(_low(leaf)[layer], top, atol=1e-4)
        np.testing.assert_allclose(leaf.base[layer], np.asarray(W[layer]) - top, atol=1e-4)
    np.testing.assert_allclose(lorax.merge({"w": leaf})["w"], W, atol=1e-5)


def test_olora_is_the_qr_of_the_torch_layout():
    rank = 4
    leaf = lorax.wrap(PARAMS, rank=rank, alpha=8.0, init="olora")["ScanLayers"]["kernel"]
    for layer in range(3):
        q, r = np.linalg.qr(np.asarray(W[layer], np.float64).T)  # [out, in] = Q R, as peft
        np.testing.assert_allclose(
            np.abs(np.asarray(leaf.b[layer], np.float64)), np.abs(q[:, :rank].T), atol=1e-4
        )
        np.testing.assert_allclose(
            _low(leaf)[layer] / leaf.scale, (q[:, :rank] @ r[:rank]).T, atol=1e-4
        )
    np.testing.assert_allclose(lorax.merge({"w": leaf})["w"], W, atol=1e-5)


def test_loftq_reduces_the_quantization_error():
    plain = lorax.merge(lorax.quantize(PARAMS, "nf4"))["ScanLayers"]["kernel"]
    errors = []
    for iterations in (1, 4):
        leaf = lorax.methods.lora_init.loftq(W, 8, 1.0, 1, 1, jnp.float32, iterations=iterations)
        assert isinstance(leaf.base, lorax.NF4Weight)
        merged = lorax.merge({"w": leaf})["w"]
        errors.append(float(jnp.linalg.norm(merged - W)))
    baseline = float(jnp.linalg.norm(plain - W))
    assert errors[0] < 0.9 * baseline and errors[1] <= errors[0] * 1.001
    leaf = lorax.wrap(PARAMS, rank=8, init="loftq")["ScanLayers"]["kernel"]
    assert isinstance(leaf.base, lorax.NF4Weight)


def test_loftq_iterations_from_wrap_alternate_as_the_algorithm_says():
    """Iteration k quantizes W - s A B of iteration k-1, then refits A B to W minus the
    dequantized base by a top-r SVD (float64 numpy here)."""
    w, rank = W[0], 4
    leaf = lorax.wrap({"w": w}, rank=rank, init="loftq", loftq_iterations=3)["w"]
    a = b = None
    for _ in range(3):
        residual = w if a is None else w - jnp.asarray(a @ b, jnp.float32)
        q = lorax.merge(lorax.quantize({"w": residual}, "nf4"))["w"]
        u, s, vt = np.linalg.svd(np.asarray(w, np.float64) - np.asarray(q, np.float64))
        a, b = u[:, :rank] * s[:rank], vt[:rank]
    np.testing.assert_allclose(leaf.base.materialize(), q, atol=1e-6)
    np.testing.assert_allclose(_low(leaf), a @ b, atol=2e-4)
    with pytest.raises(ValueError, match="loftq_iterations"):
        lorax.wrap({"w": w}, rank=rank, init="pissa", loftq_iterations=2)
    with pytest.raises(ValueError, match="loftq_iterations"):
        lorax.wrap({"w": w}, rank=rank, init="loftq", loftq_iterations=0)


def test_residual_inits_start_unchanged_and_need_a_dense_base():
    x = jax.random.normal(jax.random.key(1), (5, 32))
    f = lambda p, x: x @ p["w"]  # noqa: E731
    for init in ("pissa", "olora"):
        lp = lorax.wrap({"w": W[0]}, rank=4, init=init)
        with jax.default_matmul_precision("highest"):
            np.testing.assert_allclose(lorax.lora(f)(lp, x), f({"w": W[0]}, x), atol=1e-4)
    with pytest.raises(TypeError, match="needs a dense base"):
        lorax.wrap(lorax.quantize({"w": W[0]}, "nf4"), rank=4, init="pissa")
