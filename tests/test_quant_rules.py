"""Quantized bases under lookups and transposes: a tied embedding (``table[ids]`` and
``x @ table.T``) stored in NF4 or int8 runs through ``lorax.lora`` without densifying, and
only the gathered rows are dequantized for a lookup."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax
from tests.helpers import check_lora_equals_merged


class TiedLM(nn.Module):
    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(96, 32, name="embed")
        h = nn.Dense(32, name="proj")(embed(ids))
        return embed.attend(h)  # the head is the table, transposed


@pytest.fixture(scope="module")
def params():
    return TiedLM().init(jax.random.key(0), jnp.zeros((2, 5), jnp.int32))["params"]


IDS = jnp.array([[0, 5, 95, 17, 3], [40, 41, 2, 95, 0]])


@pytest.mark.parametrize("method", ["nf4", "int8"])
@pytest.mark.parametrize("adapt", [None, "proj", "embed"])
def test_tied_embedding_on_a_quantized_table(params, method, adapt):
    q = lorax.quantize(params, method, targets=["embedding", "kernel"], compute_dtype=jnp.float32)
    assert isinstance(q["embed"]["embedding"], (lorax.NF4Weight, lorax.Int8Weight))
    tree = q if adapt is None else lorax.wrap(q, rank=2, targets=[adapt], key=jax.random.key(1))
    tree = jax.tree.map(lambda x: x + 0.01 if x.dtype == jnp.float32 else x, tree)  # B != 0
    got = jax.jit(lorax.lora(TiedLM().apply, strict=True))({"params": tree}, IDS)
    want = jax.jit(TiedLM().apply)({"params": lorax.merge(tree)}, IDS)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    if adapt is not None:  # and the gradients with respect to the adapter
        check_lora_equals_merged(TiedLM().apply, {"params": tree}, IDS, strict_promotion=False)


def test_lookup_dequantizes_only_the_rows(params):
    q = lorax.quantize(params, "nf4", targets=["embedding"], compute_dtype=jnp.float32)
    table = q["embed"]["embedding"]
    rows = table.dequantize_rows(IDS)  # the same arithmetic (XLA may fuse it differently)
    np.testing.assert_allclose(rows, table.materialize()[IDS], rtol=1e-6, atol=1e-7)
    lookup = lorax.lora(lambda t, ids: t[ids], strict=True)
    hlo = jax.jit(lookup).lower(table, IDS).as_text()
    assert "96x32" not in hlo and "32x96" not in hlo  # no table-sized array is formed
    got = jax.jit(lookup)(table, IDS)
    np.testing.assert_allclose(got, table.materialize()[IDS], rtol=1e-6, atol=1e-7)
