"""Sharded training on 8 simulated CPU devices (conftest sets XLA_FLAGS): partition specs
derived per leaf kind, train steps on FSDP / TP / FSDP+TP meshes equal to one device, Flax
boxes, sharding constraints and shard_map on lorax leaves."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import lorax
from lorax.models import gpt2, llama, partitioning
from tests.helpers import assert_tree_close, randomize_b
from tests.multidevice.multihost_setup import train

pytestmark = pytest.mark.skipif(
    len(jax.devices()) < 8, reason="needs 8 devices (XLA_FLAGS host device count)"
)

MESHES = {"fsdp": "fsdp=8", "tp": "tp=8", "fsdp_tp": "fsdp=4,tp=2"}


def _mesh(kind):
    return partitioning.make_mesh(MESHES[kind])


def _gpt2():
    cfg = gpt2.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    return gpt2.GPT2(cfg, scan_layers=True)


def _llama():
    cfg = llama.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return llama.Llama(cfg)


def _wrapped(model, method):
    ids = jnp.zeros((1, 8), jnp.int32)
    params = model.init(jax.random.key(0), ids)["params"]
    if method == "qlora":
        params = lorax.quantize(params, "nf4", compute_dtype=jnp.float32)
    lp = lorax.wrap(params, rank=4, alpha=8, key=jax.random.key(1), dora=method == "dora")
    return params, randomize_b(lp, jax.random.key(2))


def _train(model, lp, ids, mesh=None, rules=None, steps=2):
    """``train`` of the multi-host test (AdamW on the adapters, placed with the derived specs
    on a mesh), and the trainable half's specs."""
    trainable, losses = train(model, lp, ids, mesh, rules, steps=steps)
    if mesh is None:
        return trainable, losses, None
    specs = lorax.partition_specs(lp, partitioning.logical_axes(lp), rules=rules, mesh=mesh)
    return trainable, losses, lorax.split(specs)[0]


@functools.cache
def _one_device(family, method):
    model = _gpt2() if family == "gpt2" else _llama()
    _, lp = _wrapped(model, method)
    ids = jax.random.randint(jax.random.key(3), (8, 9), 0, 64)
    want, want_losses, _ = _train(model, lp, ids)
    return model, lp, ids, want, want_losses


# Every family x method on the 2-D mesh, and each 1-D mesh with every method over the two
# families (the full product adds compile time, not coverage: FSDP 4 x TP 2 shards along
# both axes that the 1-D meshes shard one at a time).
CASES = [
    *((f, m, "fsdp_tp") for f in ("gpt2", "llama") for m in ("lora", "qlora", "dora")),
    ("gpt2", "lora", "fsdp"),
    ("llama", "qlora", "fsdp"),
    ("gpt2", "dora", "fsdp"),
    ("llama", "lora", "tp"),
    ("gpt2", "qlora", "tp"),
    ("llama", "dora", "tp"),
]


@pytest.mark.parametrize(("family", "method", "kind"), CASES)
def test_sharded_step_equals_one_device(family, method, kind):
    model, lp, ids, want, want_losses = _one_device(family, method)
    mesh = _mesh(kind)
    got, got_losses, specs = _train(model, lp, ids, mesh, partitioning.RULES[kind])
    np.testing.assert_allclose(got_losses, want_losses, rtol=2e-5)
    assert_tree_close(got, want, rtol=1e-4, atol=1e-5)
    # The adapters leave the step with the derived shardings.
    for x, spec in zip(jax.tree.leaves(got), jax.tree.leaves(specs), strict=True):
        assert x.sharding.is_equivalent_to(NamedSharding(mesh, spec), x.ndim), (x.shape, spec)
    if kind != "tp":  # something is sharded over fsdp: the frozen weights are split
        lp_specs = lorax.partition_specs(
            lp, partitioning.logical_axes(lp), rules=partitioning.RULES[kind], mesh=mesh
        )
        assert any("fsdp" in str(s) for s in jax.tree.leaves(lorax.split(lp_specs)[1]))


def test_partition_specs_per_kind():
    w = jnp.ones((2, 8, 16))  # a scanned kernel: (layers, in, out)
    spec = P(None, "fsdp", "tp")
    lp = lorax.wrap({"k": w}, rank=2, stacked=1, dora=True)
    s = lorax.partition_specs(lp, {"k": spec})["k"]
    assert (s.base, s.a, s.b, s.magnitude) == (
        spec,
        P(None, "fsdp"),
        P(None, None, "tp"),
        P(None, "tp"),
    )
    ia3 = lorax.partition_specs(lorax.ia3({"k": w[0]}, targets=["k"]), {"k": P("fsdp", "tp")})["k"]
    assert ia3.vector == P("tp")
    # NF4: the flat codes cut by every mesh axis of the weight, out axes first.
    q = lorax.quantize({"k": jnp.ones((2, 64, 64))}, "nf4", stacked=1)
    mesh = jax.sharding.AbstractMesh((4, 2), ("fsdp", "tp"))
    s = lorax.partition_specs(q, {"k": spec}, mesh=mesh)["k"]
    assert s.codes == P(None, ("tp", "fsdp")) and s.absmax == P(None, ("tp", "fsdp"))
    assert s.absmax2 == P() and s.offset == P()  # one block of scales: replicated
    placed = lorax.shard(q, {"k": spec}, mesh=partitioning.make_mesh("fsdp=4,tp=2"))
    assert placed["k"].codes.addressable_shards[0].data.size * 8 == placed["k"].codes.size


def test_partition_specs_refuses_bad_specs():
    lp = lorax.wrap({"k": jnp.ones((8, 16))}, rank=2)
    with pytest.raises(lorax.LoraxError, match="3 axes"):
        lorax.partition_specs(lp, {"k": P("a", "b", "c")})
    with pytest.raises(lorax.LoraxError, match="prefix"):
        lorax.partition_specs(lp, {"other": P()})


def _boxed_model():
    import flax.linen as nn

    init = nn.initializers.lecun_normal()

    class Mlp(nn.Module):  # MaxText-style: logical names on every kernel
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(32, kernel_init=nn.with_logical_partitioning(init, ("embed", "mlp")))(x)
            h = nn.with_logical_constraint(nn.gelu(h), ("batch", "mlp"))
            return nn.Dense(16, kernel_init=nn.with_logical_partitioning(init, ("mlp", "embed")))(h)

    return Mlp()


def test_maxtext_style_linen_model_under_a_mesh():
    import flax.linen as nn

    model = _boxed_model()
    mesh = partitioning.make_mesh("fsdp=4,tp=2")
    rules = (("batch", "fsdp"), ("embed", "fsdp"), ("mlp", "tp"))
    x = jax.random.normal(jax.random.key(0), (8, 16))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = model.init(jax.random.key(1), x)["params"]
        lp = jax.tree.map(lambda v: v + 0.05, lorax.wrap(boxed, rank=2, key=jax.random.key(2)))
        # Flax's own spec functions see every field of the leaves.
        specs = nn.get_partition_spec(lp)
        assert specs["Dense_0"]["kernel"].b == P(None, "mlp")
        mesh_specs = nn.logical_to_mesh(specs)
        assert lorax.partition_specs(lp, boxed)["Dense_1"]["kernel"].a == P("tp")
        assert mesh_specs["Dense_1"]["kernel"].a == P("tp", None)
        got = jax.jit(lorax.lora(model.apply, strict=True))({"params": lp}, x)
        want = jax.jit(model.apply)({"params": lorax.merge(lp)}, x)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        assert lorax.summary(lp).trainable == 2 * (16 + 32) + 2 * (32 + 16)
        # split / combine / merge keep the boxes
        t, f = lorax.split(lp)
        assert isinstance(lorax.combine(t, f)["Dense_0"]["kernel"].a, nn.LogicallyPartitioned)
        assert isinstance(lorax.merge(lp)["Dense_0"]["kernel"], nn.LogicallyPartitioned)
        assert lorax.merge(lp)["Dense_0"]["kernel"].names == ("embed", "mlp")
        q = lorax.quantize(boxed, "nf4", compute_dtype=jnp.float32)
        qlp = lorax.wrap(q, rank=2, key=jax.random.key(4))
        assert nn.get_partition_spec(qlp)["Dense_0"]["kernel"].a == P("embed", None)
        got = jax.jit(lorax.lora(model.apply, strict=True))({"params": qlp}, x)
        want = jax.jit(model.apply)({"params": lorax.merge(qlp)}, x)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_constraint_on_a_leaf_keeps_the_low_rank_path():
    mesh = jax.make_mesh((4, 2), ("fsdp", "tp"), axis_types=(AxisType.Auto,) * 2)
    w = randomize_b(
        lorax.wrap({"w": jnp.ones((8, 16))}, rank=2, key=jax.random.key(0)), jax.random.key(1)
    )
    x = jax.random.normal(jax.random.key(2), (8, 8))

    def f(p, x):
        return x @ jax.lax.with_sharding_constraint(p["w"], P("fsdp", "tp"))

    with jax.set_mesh(mesh):
        got = jax.jit(lorax.lora(f, strict=True))(w, x)
        jaxpr = str(jax.make_jaxpr(lorax.lora(f, strict=True))(w, x))
    np.testing.assert_allclose(got, x @ lorax.merge(w)["w"], rtol=1e-5, atol=1e-5)
    assert "spec=P('fsdp',)" in jaxpr and "spec=P(None, 'tp')" in jaxpr


def test_shard_map_over_a_lora_leaf():
    mesh = jax.make_mesh((4, 2), ("fsdp", "tp"), axis_types=(AxisType.Auto,) * 2)
    lp = randomize_b(
        lorax.wrap({"w": jnp.ones((8, 16)) * 0.1}, rank=2, key=jax.random.key(0)), jax.random.key(1)
    )
    x = jax.random.normal(jax.random.key(2), (8, 8))

    def row_parallel(x, w):  # x split on its features, w on its rows: psum the partials
        return jax.lax.psum(x @ w, "tp")

    def f(p, x):
        return jax.shard_map(
            row_parallel, mesh=mesh, in_specs=(P("fsdp", "tp"), P("tp", None)), out_specs=P("fsdp")
        )(x, p["w"])

    got = jax.jit(lorax.lora(f, strict=True))(lp, x)
    np.testing.assert_allclose(got, x @ lorax.merge(lp)["w"], rtol=1e-5, atol=1e-5)
    g = jax.grad(lambda t: lorax.lora(f)(lorax.combine(t, lorax.split(lp)[1]), x).sum())(
        lorax.split(lp)[0]
    )
    g_ref = jax.grad(lambda t: (x @ lorax.merge(lorax.combine(t, lorax.split(lp)[1]))["w"]).sum())(
        lorax.split(lp)[0]
    )
    assert_tree_close(g, g_ref, rtol=1e-4, atol=1e-5)


def test_explicit_mesh_reshard():
    mesh = jax.make_mesh((4, 2), ("fsdp", "tp"))  # explicit axes, jax.make_mesh's default
    lp = randomize_b(
        lorax.wrap({"w": jnp.ones((8, 16)) * 0.1}, rank=2, key=jax.random.key(0)), jax.random.key(1)
    )
    x = jax.random.normal(jax.random.key(2), (8, 8))
    with jax.set_mesh(mesh):
        placed = lorax.shard(lp, {"w": P("fsdp", "tp")})
        xs = jax.device_put(x, P("fsdp", None))

        def f(p, x):
            w = jax.sharding.reshard(p["w"], P(None, "tp"))  # all-gather the FSDP axis
            return jnp.dot(x, w, out_sharding=P("fsdp", "tp"))

        got = jax.jit(lorax.lora(f, strict=True))(placed, xs)
    np.testing.assert_allclose(got, x @ lorax.merge(lp)["w"], rtol=1e-5, atol=1e-5)
    assert got.sharding.spec == P("fsdp", "tp")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_from_pretrained_onto_a_mesh(family, tmp_path):
    module = gpt2 if family == "gpt2" else llama
    model = _gpt2() if family == "gpt2" else _llama()
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    module.save_pretrained(tmp_path, model, params)
    mesh = partitioning.make_mesh("fsdp=4,tp=2")
    _, placed = module.from_pretrained(tmp_path, mesh=mesh, scan_layers=family == "gpt2")
    _, plain = module.from_pretrained(tmp_path, scan_layers=family == "gpt2")
    assert_tree_close(placed, plain, rtol=0, atol=0)
    specs = lorax.partition_specs(
        plain, partitioning.logical_axes(plain), rules=partitioning.RULES["fsdp_tp"], mesh=mesh
    )
    for x, spec in zip(jax.tree.leaves(placed), jax.tree.leaves(specs), strict=True):
        assert x.sharding.is_equivalent_to(NamedSharding(mesh, spec), x.ndim)
    assert any(
        len(x.addressable_shards[0].data.shape) and x.addressable_shards[0].data.size < x.size
        for x in jax.tree.leaves(placed)
    )


def test_nnx_model_with_sharding_metadata():
    from flax import nnx

    init = nnx.initializers.lecun_normal()

    class Mlp(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.Linear(
                16, 32, kernel_init=nnx.with_partitioning(init, ("fsdp", "tp")), rngs=rngs
            )
            self.down = nnx.Linear(
                32, 16, kernel_init=nnx.with_partitioning(init, ("tp", "fsdp")), rngs=rngs
            )

        def __call__(self, x):
            return self.down(nnx.relu(self.up(x)))

    mesh = partitioning.make_mesh("fsdp=4,tp=2")
    with jax.set_mesh(mesh):
        graphdef, state = nnx.split(Mlp(nnx.Rngs(0)))
        lp = lorax.wrap(state, rank=2, key=jax.random.key(1))
        lp = jax.tree.map(lambda v: v + 0.05, lp)  # a non-zero B
        specs = lorax.partition_specs(lp, state)  # the nnx State's sharding metadata
        assert specs["down"]["kernel"].value.a == P("tp")
        placed = lorax.shard(lp, specs, mesh=mesh)
        assert placed["up"]["kernel"].value.b.sharding.spec == P(None, "tp")

        def apply(s, x):
            return nnx.merge(graphdef, s)(x)

        x = jax.random.normal(jax.random.key(2), (8, 16))
        got = jax.jit(lorax.lora(apply, strict=True))(placed, x)
        want = jax.jit(apply)(lorax.merge(lp), x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["dora", "qlora"])
def test_shard_map_over_leaves_that_cannot_slice(kind):
    """DoRA's norm runs over the sliced input axis and NF4 blocks follow the global shape:
    both enter the shard_map densified (with the warning), and the result is right."""
    mesh = jax.make_mesh((4, 2), ("fsdp", "tp"), axis_types=(AxisType.Auto,) * 2)
    w = jax.random.normal(jax.random.key(0), (64, 64)) * 0.1
    base = (
        lorax.quantize({"w": w}, "nf4", compute_dtype=jnp.float32) if kind == "qlora" else {"w": w}
    )
    lp = lorax.wrap(base, rank=2, key=jax.random.key(1), dora=kind == "dora")
    lp = jax.tree.map(lambda v: v + 0.05 if v.dtype == jnp.float32 else v, lp)
    x = jax.random.normal(jax.random.key(2), (8, 64))

    def f(p, x):
        return jax.shard_map(
            lambda x, w: jax.lax.psum(x @ w, "tp"),
            mesh=mesh,
            in_specs=(P("fsdp", "tp"), P("tp", None)),
            out_specs=P("fsdp"),
        )(x, p["w"])

    with pytest.warns(lorax.LoraxDensifyWarning, match="shard_map"):
        got = jax.jit(lorax.lora(f))(lp, x)
    np.testing.assert_allclose(got, x @ lorax.merge(lp)["w"], rtol=1e-4, atol=1e-4)


def test_from_pretrained_quantizes_onto_the_mesh(tmp_path):
    model = _llama()
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    llama.save_pretrained(tmp_path, model, params)
    mesh = partitioning.make_mesh("fsdp=4,tp=2")
    _, got = llama.from_pretrained(tmp_path, mesh=mesh, quantize="nf4")
    _, plain = llama.from_pretrained(tmp_path)
    want = lorax.quantize(plain, "nf4")
    assert jax.tree.structure(got) == jax.tree.structure(want)
    # the same 4-bit codes, computed on the shards (the block scales' mean may round apart)
    is_nf4 = lambda x: isinstance(x, lorax.NF4Weight)  # noqa: E731
    pairs = zip(
        jax.tree.leaves(got, is_leaf=is_nf4), jax.tree.leaves(want, is_leaf=is_nf4), strict=True
    )
    assert all(np.array_equal(a.codes, b.codes) for a, b in pairs if is_nf4(a))
    assert_tree_close(lorax.merge(got), lorax.merge(want), rtol=1e-6, atol=1e-7)
    codes = got["layers_0"]["mlp"]["up_proj"]["kernel"].codes
    assert codes.sharding.spec == P(("tp", "fsdp"))
    assert codes.addressable_shards[0].data.size * 8 == codes.size


def test_explicit_mesh_contracting_a_sharded_axis():
    """An explicit-axes product over an FSDP-sharded input axis names its out_sharding; the
    low-rank path names its own (the base product's, None on the rank axis)."""
    mesh = jax.make_mesh((4, 2), ("fsdp", "tp"))
    lp = lorax.wrap({"w": jnp.ones((8, 16)) * 0.1}, rank=2, key=jax.random.key(0))
    lp = jax.tree.map(lambda v: v + 0.05, lp)
    x = jax.random.normal(jax.random.key(2), (8, 8))

    def f(p, x):
        return jnp.dot(x, p["w"], out_sharding=P(None, "tp"))

    with jax.set_mesh(mesh):
        placed = lorax.shard(lp, {"w": P("fsdp", "tp")})
        xs = jax.device_put(x, P(None, "fsdp"))
        got = jax.jit(lorax.lora(f, strict=True))(placed, xs)
        t, frozen = lorax.split(placed)
        g = jax.jit(jax.grad(lambda t: lorax.lora(f)(lorax.combine(t, frozen), xs).sum()))(t)
    np.testing.assert_allclose(got, x @ lorax.merge(lp)["w"], rtol=1e-5, atol=1e-5)
    assert got.sharding.spec == P(None, "tp")
    t0, f0 = lorax.split(lp)
    g_ref = jax.grad(lambda t: (x @ lorax.merge(lorax.combine(t, f0))["w"]).sum())(t0)
    assert_tree_close(g, g_ref, rtol=1e-4, atol=1e-5)
