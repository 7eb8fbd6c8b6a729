"""TIES / DARE / magnitude-prune merging (lorax.methods.merging, lorax.add_weighted) against
Hugging Face peft's own functions and its ``add_weighted_adapter`` on the same tensors.

The DARE functions are random: they are compared with peft on one and the same keep mask
(peft draws it with ``torch.bernoulli``, which the tests replace by the mask lorax drew)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from peft.utils import merge_utils as pm

import lorax
from lorax.methods import merging

pytestmark = pytest.mark.fast_compile  # compile-bound: small shapes (tests/conftest.py)

FEW = settings(max_examples=12, deadline=None)
IN, OUT, R = 6, 5, 2  # IN * R != R * OUT != IN * OUT: a mask's shape says which tensor it is


def _t(x) -> torch.Tensor:
    return torch.from_numpy(np.array(x, np.float32))


def _np(x) -> np.ndarray:
    return np.asarray(x.detach().numpy() if isinstance(x, torch.Tensor) else x, np.float64)


def _tensors(seed: int, n: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)


class _Bernoulli:
    """Stands in for torch.bernoulli: hands peft the masks lorax drew, in peft's order."""

    def __init__(self, masks):
        self.masks = list(masks)

    def __call__(self, probs):
        mask = _t(self.masks.pop(0))
        assert mask.shape == probs.shape
        return mask


# ------------------------------------------------------------------ the functions, one by one


@FEW
@given(
    shape=st.sampled_from([(7,), (3, 4), (1, 1)]),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_prune_magnitude_is_peft(shape, density, seed):
    x = _tensors(seed, 1, shape)[0]  # continuous: no ties in magnitude
    got = merging.prune_magnitude(jnp.asarray(x), density)
    want = pm.prune(_t(x), density, method="magnitude") if density < 1 else _t(x)
    np.testing.assert_array_equal(np.asarray(got), _np(want))
    assert int(np.count_nonzero(np.asarray(got))) == min(int(density * x.size), x.size)


@FEW
@given(
    n=st.integers(1, 3),
    shape=st.sampled_from([(2, 3)]),
    method=st.sampled_from(["total", "frequency"]),
    seed=st.integers(0, 2**16),
)
def test_sign_election_and_disjoint_merge_are_peft(n, shape, method, seed):
    # small integers: sums are exact, so votes of 0 (ties go to +) happen and agree
    t = np.random.default_rng(seed).integers(-2, 3, (n, *shape)).astype(np.float32)
    mask = merging.majority_sign_mask(jnp.asarray(t), method)
    want = pm.calculate_majority_sign_mask(_t(t), method=method)
    np.testing.assert_array_equal(np.asarray(mask), want.numpy())
    merged = merging.disjoint_merge(jnp.asarray(t), mask)
    np.testing.assert_array_equal(np.asarray(merged), pm.disjoint_merge(_t(t), want).numpy())


@FEW
@given(
    n=st.integers(1, 3),
    density=st.floats(0.05, 1.0),
    method=st.sampled_from(["total", "frequency"]),
    seed=st.integers(0, 2**16),
)
def test_deterministic_merges_are_peft(n, density, method, seed):
    t = _tensors(seed, n, (4, 3))
    w = np.random.default_rng(seed + 1).uniform(-1.5, 1.5, n).astype(np.float32)
    tt, tw = [_t(x) for x in t], _t(w)
    pairs = [
        (merging.task_arithmetic(t, w), pm.task_arithmetic(tt, tw)),
        (merging.magnitude_prune(t, w, density=density), pm.magnitude_prune(tt, tw, density)),
        (
            merging.ties(t, w, density=density, majority_sign_method=method),
            pm.ties(tt, tw, density, majority_sign_method=method),
        ),
    ]
    for got, want in pairs:
        np.testing.assert_allclose(np.asarray(got), _np(want), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("density", [0.3, 0.8])
def test_random_prune_is_peft_given_the_same_mask(monkeypatch, density):
    x = _tensors(0, 1, (5, 4))[0]
    key = jax.random.key(3)
    keep = np.asarray(merging.random_keep_mask(key, density, x.shape))
    monkeypatch.setattr(torch, "bernoulli", _Bernoulli([keep, keep]))
    got = merging.prune_random(jnp.asarray(x), density, key=key)
    want = pm.prune(_t(x), density, "random", True)
    np.testing.assert_allclose(np.asarray(got), _np(want), rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(merging.prune_random(jnp.asarray(x), density, key=key, rescale=False)),
        _np(pm.random_pruning(_t(x), density, rescale=False)),
    )


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_dare_merges_are_peft_given_the_same_masks(monkeypatch, method):
    n, density, key = 3, 0.6, jax.random.key(11)
    t = _tensors(5, n, (4, 3))
    w = np.array([0.7, -0.4, 1.1], np.float32)
    keep = np.asarray(merging.random_keep_mask(key, density, t.shape))  # what lorax draws
    monkeypatch.setattr(torch, "bernoulli", _Bernoulli(list(keep) * 2))
    tt, tw = [_t(x) for x in t], _t(w)
    got = merging.dare_linear(t, w, density=density, key=key)
    np.testing.assert_allclose(np.asarray(got), _np(pm.dare_linear(tt, tw, density)), atol=1e-6)
    got = merging.dare_ties(t, w, density=density, key=key, majority_sign_method=method)
    want = pm.dare_ties(tt, tw, density, majority_sign_method=method)
    np.testing.assert_allclose(np.asarray(got), _np(want), atol=1e-6)


def test_random_prune_properties():
    x = jnp.asarray(_tensors(1, 1, (200, 200))[0])
    for density in (0.1, 0.5, 0.9):
        y = np.asarray(merging.prune_random(x, density, key=jax.random.key(7)))
        kept = y != 0
        sigma = np.sqrt(density * (1 - density) / kept.size)
        assert abs(kept.mean() - density) < 6 * sigma  # Bernoulli(density) per entry
        np.testing.assert_allclose(y[kept], np.asarray(x)[kept] / density, rtol=1e-6)
    a = merging.prune_random(x, 0.5, key=jax.random.key(7))
    b = merging.prune_random(x, 0.5, key=jax.random.key(7))
    c = merging.prune_random(x, 0.5, key=jax.random.key(8))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    np.testing.assert_array_equal(  # density 1 keeps everything, unscaled (peft's rule)
        np.asarray(merging.prune_random(x, 1.0, key=jax.random.key(7))), np.asarray(x)
    )


# ------------------------------------------------------- add_weighted against peft's model


SPECS = [(R, 4.0), (R, 1.0), (R, 6.0)]  # (rank, alpha) of each adapter


def _lorax_trees(seed=0, specs=SPECS):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(IN, OUT)).astype(np.float32)
    return [
        {
            "lin": {
                "kernel": lorax.LoraWeight(
                    jnp.asarray(base),
                    jnp.asarray(rng.normal(size=(IN, r)).astype(np.float32)),
                    jnp.asarray(rng.normal(size=(r, OUT)).astype(np.float32)),
                    scale=alpha / r,
                )
            }
        }
        for r, alpha in specs
    ]


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(IN, OUT, bias=False)

    def forward(self, x):
        return self.lin(x)


def _peft_model(trees):
    """The same adapters in peft: lora_A = a.T [r, in], lora_B = b.T [out, r], alpha / r."""
    torch.manual_seed(0)
    model: Any = None
    for i, tree in enumerate(trees):
        leaf = tree["lin"]["kernel"]
        cfg = LoraConfig(
            r=leaf.rank,
            lora_alpha=leaf.scale * leaf.rank,
            target_modules=["lin"],
            init_lora_weights=False,
        )
        if model is None:
            model = get_peft_model(_Tiny(), cfg, adapter_name="a0")
        else:
            model.add_adapter(f"a{i}", cfg)
        lin: Any = model.base_model.model.lin
        with torch.no_grad():
            lin.weight.copy_(_t(np.asarray(leaf.base).T))
            lin.lora_A[f"a{i}"].weight.copy_(_t(np.asarray(leaf.a).T))
            lin.lora_B[f"a{i}"].weight.copy_(_t(np.asarray(leaf.b).T))
    assert model is not None
    return model


def _peft_merge(trees, weights, combination, **kwargs):
    model = _peft_model(trees)
    names = [f"a{i}" for i in range(len(trees))]
    model.add_weighted_adapter(names, weights, "m", combination_type=combination, **kwargs)
    lin: Any = model.base_model.model.lin
    assert lin.scaling["m"] == 1.0
    return _np(lin.lora_A["m"].weight), _np(lin.lora_B["m"].weight)  # [r, in], [out, r]


def _delta(leaf) -> np.ndarray:
    """``s A B`` of a LoRA leaf, float64, in lorax's [in, out] layout."""
    return leaf.scale * (np.asarray(leaf.a, np.float64) @ np.asarray(leaf.b, np.float64))


WEIGHTS = [0.8, -0.5, 1.2]  # one negative: peft puts its sign on A only


@pytest.mark.parametrize(
    "combination, kwargs",
    [
        ("linear", {}),
        ("ties", dict(density=0.5)),
        ("magnitude_prune", dict(density=0.4)),
    ],
)
def test_factor_merges_are_peft_add_weighted_adapter(combination, kwargs):
    trees = _lorax_trees()
    out = lorax.add_weighted(trees, WEIGHTS, combination=combination, **kwargs)["lin"]["kernel"]
    pa, pb = _peft_merge(trees, WEIGHTS, combination, **kwargs)
    assert out.scale == 1.0
    np.testing.assert_allclose(np.asarray(out.a), pa.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.b), pb.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "combination, kwargs",
    [
        ("svd", {}),
        ("ties_svd", dict(density=0.6, majority_sign_method="frequency", svd_rank=3)),
        ("magnitude_prune_svd", dict(density=0.3)),
    ],
)
def test_delta_merges_are_peft_add_weighted_adapter(combination, kwargs):
    trees = _lorax_trees(1, [(2, 4.0), (3, 1.5)])  # the svd forms take unequal ranks
    weights = [0.9, -0.6]
    rank = kwargs.pop("svd_rank", None)
    out = lorax.add_weighted(trees, weights, combination=combination, rank=rank, **kwargs)
    out = out["lin"]["kernel"]
    pa, pb = _peft_merge(trees, weights, combination, svd_rank=rank, **kwargs)
    assert out.rank == pa.shape[0] == (rank or 3)
    np.testing.assert_allclose(_delta(out), (pb @ pa).T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "combination, kwargs",
    [
        ("dare_linear", dict(density=0.5)),
        ("dare_ties", dict(density=0.6, majority_sign_method="frequency")),
        ("dare_linear_svd", dict(density=0.7)),
        ("dare_ties_svd", dict(density=0.5)),
    ],
)
def test_dare_is_peft_add_weighted_adapter_given_the_same_masks(monkeypatch, combination, kwargs):
    """lorax draws each layer's mask of [n, size] (A as [in, r], B as [r, out], a delta as
    [in, out], flattened); peft draws one per adapter, in its layout: the same entries."""
    trees, n, density = _lorax_trees(2), len(SPECS), kwargs["density"]
    rng = np.random.default_rng(4)
    masks = {s: rng.random((n, s)) < density for s in (IN * R, R * OUT, IN * OUT)}
    monkeypatch.setattr(  # [n, layers = 1, size]
        merging, "random_keep_mask", lambda key, d, shape: masks[shape[-1]].reshape(shape)
    )
    key = jax.random.key(0)
    out = lorax.add_weighted(trees, WEIGHTS, combination=combination, key=key, **kwargs)
    out = out["lin"]["kernel"]
    if combination.endswith("_svd"):
        order = [m.reshape(IN, OUT).T for m in masks[IN * OUT]]  # deltas [out, in]
    else:  # all A's (lora_A [r, in]), then all B's (lora_B [out, r])
        order = [m.reshape(IN, R).T for m in masks[IN * R]]
        order += [m.reshape(R, OUT).T for m in masks[R * OUT]]
    monkeypatch.setattr(torch, "bernoulli", _Bernoulli(order))
    pa, pb = _peft_merge(trees, WEIGHTS, combination, **kwargs)
    if combination.endswith("_svd"):
        np.testing.assert_allclose(_delta(out), (pb @ pa).T, rtol=1e-5, atol=1e-5)
    else:
        np.testing.assert_allclose(np.asarray(out.a), pa.T, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(out.b), pb.T, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ add_weighted properties


def _same(x, y, **tol):
    for f in ("a", "b"):
        np.testing.assert_allclose(
            np.asarray(getattr(x["lin"]["kernel"], f)),
            np.asarray(getattr(y["lin"]["kernel"], f)),
            **tol,
        )


def test_density_one_and_keys():
    trees, key = _lorax_trees(3), jax.random.key(5)
    aw = lambda c, **kw: lorax.add_weighted(trees, WEIGHTS, combination=c, **kw)  # noqa: E731
    _same(aw("dare_linear", density=1.0, key=key), aw("linear"), atol=1e-6)  # drops nothing
    kw = dict(density=0.6, majority_sign_method="frequency")
    one = aw("dare_ties", key=key, **kw)
    _same(one, aw("dare_ties", key=jax.random.key(5), **kw), rtol=0, atol=0)
    other = aw("dare_ties", key=jax.random.key(6), **kw)
    assert not np.array_equal(one["lin"]["kernel"].a, other["lin"]["kernel"].a)
    t = jnp.asarray(_tensors(2, 2, (4, 3)))
    np.testing.assert_array_equal(  # peft's prune returns the tensors at density >= 1
        np.asarray(merging.dare_ties(t, [1.0, 0.5], density=1.0, key=key)),
        np.asarray(merging.ties(t, [1.0, 0.5], density=1.0)),
    )


def test_stacked_leaves_prune_each_layer_alone():
    """A stacked leaf [layers, ...] merges as its layers would one by one (peft's modules)."""
    rng = np.random.default_rng(8)
    shapes = dict(base=(3, IN, OUT), a=(3, IN, R), b=(3, R, OUT))
    stacked = [
        {"w": lorax.LoraWeight(*(jnp.asarray(rng.normal(size=s)) for s in shapes.values()))}
        for _ in range(2)
    ]
    for combination in ("ties",):
        out = lorax.add_weighted(stacked, [0.7, 0.4], combination=combination, density=0.4)
        for layer in range(3):
            sliced = [
                {"w": lorax.LoraWeight(t["w"].base[layer], t["w"].a[layer], t["w"].b[layer])}
                for t in stacked
            ]
            alone = lorax.add_weighted(sliced, [0.7, 0.4], combination=combination, density=0.4)
            got = lorax.merge({"w": out["w"]})["w"][layer]
            np.testing.assert_allclose(got, lorax.merge(alone)["w"], atol=1e-5)


def _model(params, x):
    return jnp.tanh(x @ params["lin"]["kernel"])


def test_the_merged_model_is_the_merged_weights():
    x = jax.random.normal(jax.random.key(0), (3, IN))
    out = lorax.add_weighted(_lorax_trees(6), WEIGHTS, combination="ties", density=0.5)
    with jax.default_matmul_precision("highest"):
        lazy = lorax.lora(_model)(out, x)
        dense = _model(lorax.merge(out), x)
        base = _model({"lin": {"kernel": out["lin"]["kernel"].base}}, x)
    np.testing.assert_allclose(np.asarray(lazy), np.asarray(dense), rtol=1e-5, atol=1e-5)
    assert not np.allclose(dense, base, atol=1e-3)  # the adapter matters


# ------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    "kwargs, match, cls",
    [
        (
            dict(combination="dare_linear", density=0.5),
            r"drops entries at random; pass key=",
            ValueError,
        ),
        (dict(combination="dare_ties", density=0.5, key=3), r"key must be one PRNG key", TypeError),
        (
            dict(combination="ties", density=0.5, key=jax.random.key(0)),
            r"key is only for",
            ValueError,
        ),
        (dict(combination="ties"), r"combination='ties' needs density=", ValueError),
        (dict(combination="ties", density=1.5), r"density .* must be in \[0, 1\]", ValueError),
        (
            dict(combination="dare_linear", density=0.0, key=jax.random.key(0)),
            r"\(0, 1\]",
            ValueError,
        ),
        (dict(combination="ties", density="0.5"), r"density must be a real number", TypeError),
        (dict(combination="svd", density=0.5), r"density is only for", ValueError),
        (dict(combination="ties", density=0.5, majority_sign_method="mean"), r"one of", ValueError),
        (
            dict(combination="magnitude_prune", density=0.5, majority_sign_method="total"),
            r"only for the TIES",
            ValueError,
        ),
        (dict(combination="ties", density=0.5, rank=2), r"rank is only for", ValueError),
        (dict(combination="linear_svd"), r"combination must be one of", ValueError),
    ],
)
def test_bad_arguments(kwargs, match, cls):
    with pytest.raises(cls, match=r"lorax\.add_weighted: .*" + match):
        lorax.add_weighted(_lorax_trees()[:2], [0.5, 0.5], **kwargs)


def test_pruning_needs_two_trees_and_equal_ranks():
    trees = _lorax_trees(0, [(2, 2.0), (3, 3.0)])
    with pytest.raises(ValueError, match=r"merges two or more trees.*'linear'"):
        lorax.add_weighted(trees[:1], [1.0], combination="ties_svd", density=0.5)
    with pytest.raises(ValueError, match=r"'ties' needs equal ranks; 'lin/kernel' has \[2, 3\]"):
        lorax.add_weighted(trees, [1.0, 1.0], combination="ties", density=0.5)


def test_dora_and_other_kinds_are_refused():
    lora = _lorax_trees()[0]
    leaf = lora["lin"]["kernel"]
    dora = [
        {"lin": {"kernel": lorax.DoraWeight(leaf.base, leaf.a, leaf.b, magnitude=jnp.ones(OUT))}}
        for _ in range(2)
    ]
    ia3 = {"lin": {"kernel": lorax.IA3Weight(leaf.base, jnp.ones(OUT))}}
    cases = [(dora, "dora", 0), ([lora, dora[0]], "dora", 1), ([ia3, ia3], "ia3", 0)]
    for trees, kind, at in cases:
        where = rf"'lin/kernel' is a {kind} leaf in tree {at}; only LoRA leaves"
        with pytest.raises(TypeError, match=rf"lorax\.add_weighted: {where} are combined"):
            lorax.add_weighted(trees, [0.5, 0.5], combination="cat")
        with pytest.raises(TypeError, match=rf"lorax\.stack: {where} are served"):
            lorax.stack(trees, [0, 1])
    with pytest.raises(TypeError, match="magnitudes have no weighted combination"):
        lorax.add_weighted(dora, [0.5, 0.5], combination="svd")
