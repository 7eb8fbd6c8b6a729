"""lorax.partition_specs and lorax.shard on one device: derivation per kind, prefixes,
fitting to a mesh's sizes, and clear errors for bad specs (the multi-device behaviour is in
tests/multidevice)."""

import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

import lorax

MESH = AbstractMesh((4, 2), ("fsdp", "tp"))


def test_prefix_specs_and_plain_arrays():
    params = {"blocks": {"q": jnp.ones((8, 16)), "k": jnp.ones((8, 16))}, "norm": jnp.ones(8)}
    lp = lorax.wrap(params, rank=2, targets=["q"])
    specs = lorax.partition_specs(lp, {"blocks": P(None, "tp"), "norm": P()})  # a prefix
    assert specs["blocks"]["k"] == P(None, "tp") and specs["blocks"]["q"].b == P(None, "tp")
    assert specs["norm"] == P()
    assert lorax.partition_specs(lp, None)["blocks"]["q"].a == P()  # None: replicated
    with pytest.raises(lorax.LoraxError, match="'blocks'.*2 axes"):  # a 2-D spec on a vector
        lorax.partition_specs({"blocks": {"bias": jnp.ones(4)}}, {"blocks": P(None, "tp")})


def test_fitting_replicates_what_the_mesh_does_not_divide():
    lp = lorax.wrap({"w": jnp.ones((6, 16))}, rank=3)  # 6 rows: tp (2) divides, fsdp (4) not
    s = lorax.partition_specs(lp, {"w": P(("tp", "fsdp"), None)}, mesh=MESH)["w"]
    assert s.base == P("tp") and s.a == P("tp")


def test_bad_specs_name_the_path():
    lp = lorax.wrap({"w": jnp.ones((8, 16))}, rank=2)
    with pytest.raises(lorax.LoraxError, match="'w'.*not axes of the mesh.*rules="):
        lorax.partition_specs(lp, {"w": P("embed", None)}, mesh=MESH)
    with pytest.raises(lorax.LoraxError, match="'w'.*expected a PartitionSpec"):
        lorax.partition_specs(lp, {"w": "fsdp"})
    with pytest.raises(lorax.LoraxError, match="pass mesh="):
        lorax.shard(lp, {"w": P()})


def test_split_halves_of_specs_line_up_with_the_tree():
    lp = lorax.wrap({"w": jnp.ones((8, 16))}, rank=2)
    t_specs, f_specs = lorax.split(lorax.partition_specs(lp, {"w": P("fsdp", "tp")}))
    t, f = lorax.split(lp)
    assert jax.tree.structure(t_specs) == jax.tree.structure(t)
    assert jax.tree.structure(f_specs) == jax.tree.structure(f)


@settings(max_examples=25, deadline=None)
@given(
    stack=st.integers(0, 1),
    n_in=st.integers(1, 2),
    n_out=st.integers(1, 2),
    rank=st.integers(1, 3),
    data=st.data(),
)
def test_lora_factor_specs_follow_their_axes(stack, n_in, n_out, rank, data):
    """For random layouts and specs: a keeps the stack and input axes' entries, b the stack
    and output axes', both None on the rank; each factor's spec fits its shape."""
    shape = (2,) * stack + (4,) * n_in + (8,) * n_out
    labels = data.draw(
        st.lists(st.sampled_from([None, "fsdp", "tp"]), min_size=len(shape), max_size=len(shape))
    )
    if len([x for x in labels if x]) != len({x for x in labels if x}):
        labels = [None] * len(shape)  # a mesh axis may shard one axis only
    leaf = lorax.LoraWeight(
        jnp.ones(shape),
        jnp.ones((2,) * stack + (4,) * n_in + (rank,)),
        jnp.ones((2,) * stack + (rank,) + (8,) * n_out),
    )
    s = lorax.sharding.field_specs(leaf, P(*labels))
    pad = lambda spec, n: tuple(spec) + (None,) * (n - len(spec))  # noqa: E731
    a, b = pad(s.a, leaf.a.ndim), pad(s.b, leaf.b.ndim)
    assert a == tuple(labels[: stack + n_in]) + (None,)
    assert b == tuple(labels[:stack]) + (None,) + tuple(labels[stack + n_in :])
