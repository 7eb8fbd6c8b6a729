"""The leaf protocol (lorax/leaf.py): what a kind declares, the one primitive hook, the kind
registry that checkpoints use, and the order rule -> leaf -> densify."""

import dataclasses
import warnings
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax
from lorax.io import checkpoint
from lorax.leaf import LEAF_KINDS, OverBase, leaf_kind

pytestmark = pytest.mark.fast_compile  # compile-bound: small shapes (tests/conftest.py)


@lorax.register_leaf(kind="test.row_scaled")
class RowScaled(OverBase):
    """``W * s[:, None]``: a trainable scale per input row. Handles ``dot_general`` (as
    ``(x * s) @ W``) and ``cumsum`` through the hook, which no built-in kind does."""

    base: Any
    s: Any
    trainable_fields: ClassVar[tuple[str, ...]] = ("s",)

    def materialize(self):
        return self.base * self.s[:, None].astype(self.base.dtype)

    def misfit(self):
        return super().misfit() or (
            None
            if self.s is None or self.s.shape == self.shape[:1]
            else f"s {self.s.shape} does not fit {self.shape}"
        )

    def handle_primitive(self, call: lorax.PrimitiveCall):
        if call.name == "cumsum" and call.params["axis"] == 1:  # rows scale through a row cumsum
            return call.bind_one(self.base) * self.s[:, None]
        return super().handle_primitive(call)

    def dot_general(
        self,
        other,
        *,
        dimension_numbers,
        leaf_is_lhs,
        precision,
        preferred_element_type,
        bind,
        rng=None,
    ):
        if not lorax.leaf.input_product(
            dimension_numbers, leaf_is_lhs=leaf_is_lhs, stack_ndim=0, in_ndim=1
        ):
            return NotImplemented
        return bind(other * self.s[None, :], self.base)  # x is [batch, in] here


def _row_scaled(seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return RowScaled(jax.random.normal(k1, (6, 4)), 1 + jax.random.normal(k2, (6,)))


def test_a_new_kind_declares_its_fields():
    assert RowScaled.kind == "test.row_scaled"
    assert RowScaled.frozen_fields == ("base",) and RowScaled.static_fields == ()
    assert lorax.LoraWeight.kind == "lora" and lorax.DoraWeight.kind == "dora"
    assert lorax.LoraWeight.frozen_fields == ("base",)
    assert lorax.LoraWeight.static_fields == ("scale", "dropout")
    assert lorax.NF4Weight.trainable_fields == () and lorax.NF4Weight.kind == "nf4"
    assert not lorax.AdapterWeight.has_dense_form and lorax.Unfrozen.dense_is_free
    for name in ("LoraWeight", "DoraWeight", "IA3Weight", "AdapterWeight", "NF4Weight"):
        assert LEAF_KINDS[name].kind != name  # old class names stay as aliases


def test_the_hook_handles_any_primitive_without_densifying():
    leaf = _row_scaled()
    x = jax.random.normal(jax.random.key(3), (5, 6))

    def f(p, x):
        return x @ p["w"], jnp.cumsum(p["w"], axis=1)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no densify warning: the hook did both
        got = jax.jit(lorax.lora(f, strict=True))({"w": leaf}, x)
    want = f({"w": np.asarray(leaf.materialize(), np.float64)}, np.asarray(x, np.float64))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_the_tree_tools_and_checkpoints_use_the_declarations(tmp_path):
    tree = {"w": _row_scaled(), "b": jnp.ones(4)}
    trainable, frozen = lorax.split(tree)
    assert trainable["w"].base is None and frozen["w"].s is None
    assert jax.tree.leaves(lorax.mask(tree)) == [False, False, True]
    with pytest.raises(ValueError, match=r"at 'w' s \(3,\) does not fit"):
        lorax.combine({"w": dataclasses.replace(trainable["w"], s=jnp.ones(3)), "b": None}, frozen)
    lorax.save(tmp_path / "ck", tree)
    meta = checkpoint.adapter_state(tree)[1]
    assert meta["leaves"]["w"]["kind"] == "test.row_scaled"
    back = lorax.load(tmp_path / "ck", {"w": tree["w"].base, "b": tree["b"]})
    np.testing.assert_array_equal(back["w"].s, tree["w"].s)


def test_version_1_checkpoints_with_class_names_still_load(tmp_path, monkeypatch):
    lp = lorax.wrap({"w": jnp.ones((8, 8))}, rank=2, key=jax.random.key(1))
    monkeypatch.setattr(lorax.LoraWeight, "kind", "LoraWeight")  # what version 1 wrote
    monkeypatch.setattr(checkpoint, "VERSION", 1)
    lorax.save(tmp_path / "v1", lp)
    assert checkpoint.adapter_state(lp)[1]["leaves"]["w"]["kind"] == "LoraWeight"
    monkeypatch.undo()
    back = lorax.load(tmp_path / "v1", {"w": jnp.ones((8, 8))})
    assert type(back["w"]) is lorax.LoraWeight
    np.testing.assert_array_equal(back["w"].a, lp["w"].a)


def test_registry_errors():
    with pytest.raises(lorax.LoraxError, match=r"kind 'lora' is taken by .*LoraWeight"):

        @lorax.register_leaf(kind="lora")
        class Other(OverBase):
            base: Any

    with pytest.raises(ValueError, match=r"trainable_fields names \['c'\].*\('base', 'a'\)"):

        @lorax.register_leaf(kind="test.bad_fields")
        class Bad(OverBase):
            base: Any
            a: Any
            trainable_fields = ("a", "c")

    with pytest.raises(TypeError, match="expected a subclass of LoraxLeaf"):
        lorax.register_leaf(int)
    with pytest.raises(KeyError, match=r"no leaf kind is registered as 'nope'.*'lora'"):
        leaf_kind("nope")


def test_the_rule_is_asked_before_the_leaf():
    lp = lorax.wrap({"w": jnp.ones((4, 4))}, rank=2)
    calls = []

    def rule(ctx, invals):
        calls.append(ctx.names)
        return NotImplemented  # pass: the leaf's hook computes it

    f = lorax.lora(lambda p, x: x @ p["w"])
    with lorax.using_rules({"dot_general": rule}):
        got = f(lp, jnp.ones((2, 4)))
    assert calls == [(None, "w")]  # x @ w: the leaf is the right operand
    np.testing.assert_allclose(got, jnp.ones((2, 4)) @ lorax.merge(lp)["w"])
    with lorax.using_rules({"dot_general": lambda ctx, invals: jnp.zeros((2, 4))}):
        assert float(jnp.abs(f(lp, jnp.ones((2, 4)))).sum()) == 0.0
    assert float(jnp.abs(f(lp, jnp.ones((2, 4)))).sum()) > 0  # restored


def test_a_leaf_returning_the_wrong_shape_is_named():
    @lorax.register_leaf(kind="test.wrong_shape")
    class Wrong(RowScaled):
        def dot_general(self, other, **kwargs):
            return jnp.zeros((1,))

    leaf = Wrong(jnp.ones((6, 4)), jnp.ones(6))
    with pytest.raises(lorax.LoraxError, match=r"test\.wrong_shape leaf at 'w'.*\(1,\).*\(2, 4\)"):
        lorax.lora(lambda p, x: x @ p["w"])({"w": leaf}, jnp.ones((2, 6)))


def test_a_kind_without_a_dense_form_is_never_densified():
    tree = lorax.adapters({"proj": {"kernel": jnp.ones((4, 4))}}, targets=["proj"])
    f = lorax.lora(lambda p: jnp.cumsum(p["proj"]["kernel"], axis=0))
    with pytest.raises(
        lorax.LoraxDensifyError,
        match=r"adapter leaf at 'proj/kernel', which "
        r"has none: .*cannot be merged",
    ):
        f(tree)


def test_dora_has_a_lora_leaf_rather_than_being_one():
    lp = lorax.wrap(
        {"w": jax.random.normal(jax.random.key(0), (8, 6))}, rank=2, key=jax.random.key(1)
    )
    leaf = lorax.methods.dora.dora_from_lora(lp["w"])
    assert not isinstance(leaf, lorax.LoraWeight)
    assert type(leaf.lora) is lorax.LoraWeight and leaf.lora.a is leaf.a
    assert leaf.frozen_fields == ("base",)
