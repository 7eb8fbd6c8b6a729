"""Multi-adapter serving: each row of one batch equals that row run alone with its adapter
merged, through the reference models (scanned and not) and generate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import randomize_b

import lorax
from lorax.models import generate, llama

pytestmark = pytest.mark.fast_compile  # compile-bound: small shapes (tests/conftest.py)


def _model(scan_layers):
    model = llama.Llama(
        llama.LlamaConfig(
            vocab_size=53,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        scan_layers=scan_layers,
    )
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    return model, jax.tree.map(lambda x: x * 6 if x.ndim > 1 else x, params)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_rows_equal_their_adapter_merged(scan_layers):
    model, params = _model(scan_layers)
    adapters = [
        randomize_b(
            lorax.wrap(
                params, rank=r, alpha=a, targets=["q_proj", "v_proj"], key=jax.random.key(10 + i)
            ),
            jax.random.key(20 + i),
            scale=0.5,
        )
        for i, (r, a) in enumerate([(2, 4.0), (4, 4.0), (3, 9.0)])
    ]
    index = np.array([2, 0, 1, 2, 0])
    ids = np.random.default_rng(0).integers(0, 53, (5, 6))
    served = lorax.stack(adapters, index)
    with jax.default_matmul_precision("highest"):
        out = np.asarray(jax.jit(lorax.lora(model.apply))({"params": served}, ids))
        dense = jax.jit(model.apply)  # one compiled program for the five rows
        for row, k in enumerate(index):
            alone = dense({"params": lorax.merge(adapters[k])}, ids[row : row + 1])
            np.testing.assert_allclose(out[row], alone[0], atol=1e-4, rtol=1e-4)
    new = generate(model, served, ids, 5)
    for row, k in enumerate(index):
        np.testing.assert_array_equal(
            new[row], generate(model, lorax.merge(adapters[k]), ids[row : row + 1], 5)[0]
        )


def test_stack_errors():
    model, params = _model(False)
    t = lorax.wrap(params, rank=2, targets=["q_proj"])
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        lorax.stack([t], [0, 1])
    with pytest.raises(ValueError, match="some trees only"):
        lorax.stack([t, params], [0, 1])
    with pytest.raises(ValueError, match="no single dense weight"):
        lorax.merge(lorax.stack([t, t], [0, 1]))
