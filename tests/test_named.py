"""Named adapters (lorax.AdapterSet): outputs against numpy float64 on the merged weights,
the base when disabled, errors, compile counts under jit, save / load round trips."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lorax

pytestmark = pytest.mark.fast_compile  # compile-bound: small shapes (tests/conftest.py)

PARAMS = {
    "l1": {"kernel": jnp.asarray(np.random.default_rng(0).normal(size=(6, 8)), jnp.float32)},
    "l2": {
        "kernel": jnp.asarray(np.random.default_rng(1).normal(size=(8, 4)), jnp.float32),
        "bias": jnp.asarray(np.random.default_rng(2).normal(size=(4,)), jnp.float32),
    },
}
X = np.random.default_rng(3).normal(size=(3, 6)).astype(np.float32)


def model(p, x):
    h = jnp.tanh(x @ p["l1"]["kernel"])
    return h @ p["l2"]["kernel"] + p["l2"]["bias"][None, :]


APPLY = lorax.lora(model)


def trained(seed, rank, alpha=None, **kw):
    """A wrapped tree with random (non-zero) factors: an adapter trained elsewhere."""
    lp = lorax.wrap(PARAMS, rank=rank, alpha=alpha or rank, key=jax.random.key(seed), **kw)
    t, f = lorax.split(lp)
    keys = iter(jax.random.split(jax.random.key(seed + 100), 16))
    t = jax.tree.map(lambda x: 0.3 * jax.random.normal(next(keys), x.shape, x.dtype), t)
    return lorax.combine(t, f)


def reference(tree, x=X):
    """numpy float64 on the merged weights, from the leaves' own factors."""

    def dense(leaf):
        if isinstance(leaf, lorax.LoraWeight):
            a, b = np.asarray(leaf.a, np.float64), np.asarray(leaf.b, np.float64)
            return np.asarray(leaf.base, np.float64) + leaf.scale * a @ b
        if isinstance(leaf, lorax.Unfrozen):
            return np.asarray(leaf.value, np.float64)
        return np.asarray(leaf, np.float64)

    p = jax.tree.map(dense, tree, is_leaf=lorax.is_lorax_leaf)
    h = np.tanh(np.asarray(x, np.float64) @ p["l1"]["kernel"])
    return h @ p["l2"]["kernel"] + p["l2"]["bias"][None, :]


A, B, C = trained(1, 2), trained(2, 2), trained(3, 3, alpha=6.0)


def build():
    return lorax.AdapterSet.create(A, name="a").add("b", B).add("c", C)


def test_each_selected_adapter_computes_its_own_tree():
    ads = build()
    assert ads.names == ("a", "b", "c") and ads.active == "a"
    for name, own in zip(ads.names, (A, B, C)):
        sel = ads.select(name)
        assert jax.tree.structure(sel.tree(), is_leaf=lorax.is_lorax_leaf) == jax.tree.structure(
            own, is_leaf=lorax.is_lorax_leaf
        )
        with jax.default_matmul_precision("highest"):
            y = APPLY(sel.tree(), X)
        np.testing.assert_allclose(y, reference(own), rtol=1e-5, atol=1e-5)
        # no copy: the base arrays are the ones given, the factors those of its own tree
        assert sel.tree()["l1"]["kernel"].base is PARAMS["l1"]["kernel"]
        assert sel.tree()["l1"]["kernel"].a is own["l1"]["kernel"].a
    # the adapters differ from each other and from the base
    outs = [reference(t) for t in (A, B, C)] + [reference(PARAMS)]
    assert min(np.abs(u - v).max() for i, u in enumerate(outs) for v in outs[i + 1 :]) > 1e-2


def test_disable_is_the_base_and_select_enables_again():
    ads = build().select("b").disable()
    assert ads.active is None and ads.names == ("a", "b", "c")
    tree = ads.tree()
    assert jax.tree.leaves(tree) == jax.tree.leaves(PARAMS)  # the same arrays, no adapter
    assert all(x is y for x, y in zip(jax.tree.leaves(tree), jax.tree.leaves(PARAMS)))
    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(APPLY(tree, X), reference(PARAMS), rtol=1e-5, atol=1e-5)
    t, f = ads.split()
    assert jax.tree.leaves(t) == []
    assert all(x is y for x, y in zip(jax.tree.leaves(f), jax.tree.leaves(PARAMS)))
    back = ads.select("b")
    np.testing.assert_allclose(reference(back.tree()), reference(B))


def test_operations_return_new_objects():
    ads = lorax.AdapterSet.create(A, name="a")
    more = ads.add("b", B)
    assert ads.names == ("a",) and more.names == ("a", "b")
    assert more.select("b").active == "b" and more.active == "a"
    assert more.delete("b").names == ("a",) and more.names == ("a", "b")


def test_add_a_trainable_half_takes_the_frozen_half():
    trainable, _ = lorax.split(B)
    ads = lorax.AdapterSet.create(A, name="a").add("b", trainable).select("b")
    np.testing.assert_allclose(reference(ads.tree()), reference(B))
    assert ads.tree()["l2"]["kernel"].base is PARAMS["l2"]["kernel"]


def test_unfrozen_and_quantized_bases():
    # a weight trained in full (modules to save) has no base: its own value is used
    head = lorax.unfreeze(trained(4, 2), targets=["bias"])
    head = head | {"l2": head["l2"] | {"bias": lorax.Unfrozen(PARAMS["l2"]["bias"] + 1.0)}}
    ads = lorax.AdapterSet.create(A, name="a").add("head", head).select("head")
    np.testing.assert_allclose(reference(ads.tree()), reference(head))
    np.testing.assert_allclose(reference(ads.disable().tree()), reference(PARAMS))
    # QLoRA: the base stays quantized; disable gives the NF4 tree itself
    qp = lorax.quantize(PARAMS, "nf4")
    q = lorax.AdapterSet.create(lorax.wrap(qp, rank=2, key=jax.random.key(0)), name="q")
    q = q.add("r", lorax.wrap(qp, rank=2, key=jax.random.key(1)))
    off = q.disable().tree()
    assert all(
        x is y
        for x, y in zip(
            jax.tree.leaves(off, is_leaf=lorax.is_lorax_leaf),
            jax.tree.leaves(qp, is_leaf=lorax.is_lorax_leaf),
        )
    )


def test_add_refuses_another_base_naming_the_path():
    ads = lorax.AdapterSet.create(A, name="a")
    other_shape = PARAMS | {"l2": PARAMS["l2"] | {"bias": jnp.zeros(5)}}
    with pytest.raises(lorax.LoraxError, match=r"adapter 'x'.*l2/bias.*\[5\].*\[4\]"):
        ads.add("x", lorax.wrap(other_shape, rank=2, targets=["l1"]))
    other_dtype = PARAMS | {"l1": {"kernel": PARAMS["l1"]["kernel"].astype(jnp.bfloat16)}}
    with pytest.raises(ValueError, match=r"adapter 'x'.*l1/kernel.*bfloat16"):
        ads.add("x", lorax.wrap(other_dtype, rank=2))
    other_values = PARAMS | {"l1": {"kernel": PARAMS["l1"]["kernel"] + 1.0}}
    with pytest.raises(ValueError, match=r"adapter 'x'.*l1/kernel.*other values"):
        ads.add("x", lorax.wrap(other_values, rank=2))
    extra = PARAMS | {"l3": {"kernel": jnp.ones((4, 4))}}
    with pytest.raises(ValueError, match=r"adapter 'x'.*l3/kernel"):
        ads.add("x", lorax.wrap(extra, rank=2))
    # equal values in other arrays are the same base
    copy = jax.tree.map(lambda x: jnp.array(x, copy=True), PARAMS)
    assert ads.add("x", lorax.wrap(copy, rank=2)).names == ("a", "x")


def test_errors_name_the_adapter():
    ads = build()
    with pytest.raises(ValueError, match=r"'b' exists already"):
        ads.add("b", B)
    with pytest.raises(ValueError, match=r"no adapter leaves"):
        ads.add("x", PARAMS)
    with pytest.raises(ValueError, match=r"no adapter named 'z'.*\['a', 'b', 'c'\]"):
        ads.select("z")
    with pytest.raises(ValueError, match=r"no adapter named 'z'"):
        ads.delete("z")
    with pytest.raises(ValueError, match=r"'a' is the active one"):
        ads.delete("a")
    assert ads.select("b").delete("a").names == ("b", "c")
    assert ads.disable().delete("a").names == ("b", "c")
    with pytest.raises(TypeError, match=r"non-empty str; got 3"):
        ads.add(3, B)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"non-empty str; got ''"):
        lorax.AdapterSet.create(A, name="")
    with pytest.raises(ValueError, match=r"adapter 'h'.*half of lorax.split"):
        lorax.AdapterSet.create(lorax.split(A)[0], name="h")
    rank3, _ = lorax.split(C)  # a half of another rank does not fit adapter a's frozen half
    with pytest.raises(ValueError, match=r"adapter 'x'.*frozen half of adapter 'a'"):
        ads.add("x", rank3)
    with pytest.raises(ValueError, match=r"'q'.*not among"):
        ads.stack(["a", "q"])


def test_stack_serves_a_mixed_batch():
    ads = build()
    served = ads.stack(["c", "a", "b"])
    with jax.default_matmul_precision("highest"):
        y = APPLY(served, X)
    for row, own in enumerate((C, A, B)):
        np.testing.assert_allclose(y[row], reference(own)[row], rtol=1e-5, atol=1e-5)
    some = ads.stack(jnp.array([1, 0, 1]), names=["b", "c"])
    with jax.default_matmul_precision("highest"):
        y = APPLY(some, X)
    for row, own in enumerate((C, B, C)):
        np.testing.assert_allclose(y[row], reference(own)[row], rtol=1e-5, atol=1e-5)


def test_swapping_adapters_reuses_the_compiled_step():
    traces = []

    @jax.jit
    def step(trainable, frozen, x):
        traces.append(1)  # runs once per trace (compilation), not per call
        return APPLY(lorax.combine(trainable, frozen), x)

    ads = build().add("d", trained(5, 2))  # d: rank 2, as a and b
    ys = {}
    for name in ("a", "b", "d"):
        ys[name] = step(*ads.select(name).split(), X)
    assert len(traces) == 1  # same shapes and scale: one compilation for three adapters
    # the frozen half of one adapter serves the others of the same shapes
    _, frozen = ads.split()
    y = step(ads.select("b").trainable(), frozen, X)
    assert len(traces) == 1
    np.testing.assert_array_equal(y, ys["b"])
    step(*ads.select("c").split(), X)  # rank 3: one more
    assert len(traces) == 2
    y0 = step(*ads.disable().split(), X)  # no adapter: one more, then cached
    step(*ads.disable().split(), X)
    assert len(traces) == 3
    for name in ("a", "c"):
        step(*ads.select(name).split(), X)
    assert len(traces) == 3
    np.testing.assert_allclose(y0, reference(PARAMS), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ys["d"], reference(ads.select("d").tree()), rtol=1e-4, atol=1e-4)
    assert np.abs(ys["a"] - ys["b"]).max() > 1e-2  # the swap changed the result


def _leaves_equal(x, y):
    fx, dx = jax.tree.flatten(x, is_leaf=lambda v: v is None)
    fy, dy = jax.tree.flatten(y, is_leaf=lambda v: v is None)
    assert dx == dy  # structure and static fields (kind, scale, ...)
    for u, v in zip(fx, fy):
        assert (u is None) == (v is None)
        if u is not None and v is not None:
            assert np.asarray(u).dtype == np.asarray(v).dtype
            np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_save_load_round_trip(tmp_path):
    head = lorax.unfreeze(trained(4, 2, dora=True), targets=["bias"])
    ads = lorax.AdapterSet.create(A, name="a").add("dora + head", head)
    ads = ads.add("a/b ü", trained(6, 1)).select("a/b ü")
    path = tmp_path / "ads"
    lorax.save_adapters(path, ads)
    back = lorax.load_adapters(path, PARAMS)
    assert back.names == ads.names and back.active == "a/b ü"
    for name in ads.names:
        _leaves_equal(back.adapters[name], ads.adapters[name])
        _leaves_equal(back.select(name).tree(), ads.select(name).tree())
    assert all(x is y for x, y in zip(jax.tree.leaves(back.base), jax.tree.leaves(PARAMS)))
    # an existing directory: refused, replaced with force=True, its state kept (disabled)
    with pytest.raises(lorax.CheckpointError, match="already exists"):
        lorax.save_adapters(path, ads)
    lorax.save_adapters(path, ads.disable().delete("a").delete("dora + head"), force=True)
    back = lorax.load_adapters(path, PARAMS)
    assert back.active is None and back.names == ("a/b ü",)
    assert [p.name for p in tmp_path.iterdir()] == ["ads"]  # no leftovers beside it
    # never replaces what is not named adapters
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "notes.txt").write_text("not adapters")
    with pytest.raises(lorax.CheckpointError, match="holds no named adapters"):
        lorax.save_adapters(tmp_path / "one", ads, force=True)
    with pytest.raises(lorax.CheckpointError, match="holds no named adapters"):
        lorax.load_adapters(tmp_path / "one", PARAMS)
    with pytest.raises(FileNotFoundError):
        lorax.load_adapters(tmp_path / "none", PARAMS)
    with pytest.raises(ValueError, match=r"adapter 'a/b ü'.*shape"):
        small = PARAMS | {"l1": {"kernel": jnp.ones((6, 5))}}
        lorax.load_adapters(path, small)
    nan = jax.tree.map(lambda x: x * np.nan, lorax.split(trained(7, 2))[0])
    bad = build().add("nan", nan)
    with pytest.raises(lorax.NonFiniteError, match=r"adapter 'nan'"):
        lorax.save_adapters(tmp_path / "bad", bad)
    assert not (tmp_path / "bad").exists()


OPS = st.lists(
    st.tuples(st.sampled_from(["add", "select", "delete", "disable"]), st.sampled_from("xyz")),
    max_size=12,
)
TREES = {"x": A, "y": B, "z": C}


@settings(max_examples=40, deadline=None)
@given(OPS)
def test_operations_follow_peft_semantics(ops):
    """Against a plain model of peft's bookkeeping: an ordered dict of names and an active
    name; refused operations leave everything as it was."""
    ads, names, active = lorax.AdapterSet.create(A, name="x"), ["x"], "x"
    for op, name in ops:
        ok = {
            "add": name not in names,
            "select": name in names,
            "delete": name in names and name != active,
            "disable": True,
        }[op]
        if not ok:
            with pytest.raises(lorax.LoraxError, match=f"'{name}'"):
                getattr(ads, op)(name, TREES[name]) if op == "add" else getattr(ads, op)(name)
            continue
        if op == "add":
            ads, names = ads.add(name, TREES[name]), [*names, name]
        elif op == "select":
            ads, active = ads.select(name), name
        elif op == "delete":
            ads, names = ads.delete(name), [n for n in names if n != name]
        else:
            ads, active = ads.disable(), None
        assert ads.names == tuple(names) and ads.active == active
    tree = ads.tree()
    if active is None:
        assert all(x is y for x, y in zip(jax.tree.leaves(tree), jax.tree.leaves(PARAMS)))
    else:
        assert tree["l1"]["kernel"].a is TREES[active]["l1"]["kernel"].a
