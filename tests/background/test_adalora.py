"""AdaLoRA: the leaf against the merged dense model and numpy float64; the training pieces
(orthogonal regularizer, importance, budget schedule, mask_to_budget) against peft's own
RankAllocator and AdaLoraModel code on the same tensors; a jitted training loop that ends
at the target budget; adapters to and from peft on a tiny GPT-2, logit by logit."""

import dataclasses
import functools
import json
import types
import typing

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import check_lora_equals_merged
from hypothesis import given, settings
from hypothesis import strategies as st

import lorax
from lorax.errors import LoraxValueError
from lorax.methods.adalora import kept_ranks, triplet_scores

pytestmark = pytest.mark.fast_compile  # compile-bound: small shapes (tests/conftest.py)

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
from peft.tuners.adalora.layer import RankAllocator  # noqa: E402


def _randomized(tree, seed, keep=None, scale=1.0):
    """Every AdaLoRA leaf with random a, e, b (numpy float32); ``keep(path, shape)`` gives
    its mask (None: all kept), and pruned entries of e are zero, as after mask_to_budget."""
    rng = np.random.default_rng(seed)

    def fill(key_path, x):
        if not isinstance(x, lorax.AdaLoraWeight):
            return x
        mask = np.ones(x.mask.shape, np.float32)
        if keep is not None:
            mask = keep(jax.tree_util.keystr(key_path), x.mask.shape).astype(np.float32)
        draw = lambda s: (scale * rng.normal(size=s)).astype(np.float32)  # noqa: E731
        return x.replace(
            a=jnp.asarray(draw(x.a.shape)),
            e=jnp.asarray(draw(x.e.shape) * mask),
            b=jnp.asarray(draw(x.b.shape)),
            mask=jnp.asarray(mask),
        )

    return jax.tree_util.tree_map_with_path(fill, tree, is_leaf=lorax.is_lorax_leaf)


# ------------------------------------------------------------------- the leaf itself
def _model(params, x):
    """A 2-D kernel, a per-head 3-D kernel (DenseGeneral) and a scanned layer stack."""
    h = jnp.tanh(x @ params["proj"]["kernel"])  # (n, 6) @ (6, 8)
    heads = jnp.einsum("nd,dhk->nhk", h, params["heads"]["kernel"])  # (8, 2, 4)
    h = h + 0.5 * heads.reshape(h.shape)

    def layer(h, w):
        return jnp.tanh(h @ w), None

    h, _ = jax.lax.scan(layer, h, params["stack"]["kernel"])  # (2, 8, 8)
    return h


def _params():
    rng = np.random.default_rng(0)
    draw = lambda *s: jnp.asarray(rng.normal(size=s).astype(np.float32) / 3)  # noqa: E731
    return {
        "proj": {"kernel": draw(6, 8)},
        "heads": {"kernel": draw(8, 2, 4)},
        "stack": {"kernel": draw(2, 8, 8)},
    }


def _targets(path, leaf):
    if "stack" in path:
        return lorax.LoraSpec(stack_axes=1)
    return lorax.LoraSpec(in_axes=1) if "heads" in path else True


@functools.cache
def _tree():
    """The AdaLoRA tree of ``_params`` (init rank 3, alpha 5), built once for the file."""
    return lorax.adalora(_params(), init_rank=3, target_rank=2, alpha=5.0, targets=_targets)


def _every_other(path, shape):
    return (np.arange(int(np.prod(shape))).reshape(shape) % 2 == 0) | (len(shape) > 1)


def test_forward_and_gradients_equal_the_merged_model():
    tree = _tree()
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 6)).astype(np.float32))
    # at init e = 0: the weights are the base's
    for got, want in zip(jax.tree.leaves(jax.jit(lorax.merge)(tree)), jax.tree.leaves(_params())):
        np.testing.assert_array_equal(got, want)
    # masked entries (every other triplet of the unstacked leaves) must not count
    tree = _randomized(tree, 0, keep=lambda p, s: _every_other(p, s))
    assert tree["stack"]["kernel"].stack_ndim == 1 and tree["heads"]["kernel"].in_ndim == 1
    check_lora_equals_merged(_model, tree, x, rtol=1e-5, atol=1e-5)


def test_merge_equals_numpy_float64_svd_form():
    tree = _tree()
    tree = _randomized(tree, 1, keep=lambda p, s: _every_other(p, s))
    leaf = tree["heads"]["kernel"]
    dense = jax.jit(lorax.merge)(tree)["heads"]["kernel"]
    a, e, b, m = (np.asarray(getattr(leaf, n), np.float64) for n in ("a", "e", "b", "mask"))
    assert 0 < m.sum() < m.size
    want = np.asarray(leaf.base, np.float64) + 5.0 / (3 + 1e-5) * np.einsum(
        "ir,r,rhk->ihk", a, e * m, b
    )
    np.testing.assert_allclose(dense, want, rtol=1e-5, atol=1e-5)
    # a masked singular value changes nothing, even if it was not zeroed
    hidden = leaf.replace(e=leaf.e + (1.0 - leaf.mask) * 7.0)
    np.testing.assert_allclose(
        jax.jit(lambda x: x.materialize())(hidden), dense, rtol=1e-6, atol=1e-6
    )


# ------------------------------------------------- the training pieces against peft's code
class _Toy(torch.nn.Module):
    """Two bias-free Linear layers; the loss field makes AdaLoraModel.forward add its
    orthogonal regularization, which is then all the loss holds."""

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Linear(6, 5, bias=False)
        self.q = torch.nn.Linear(5, 4, bias=False)

    def forward(self, x):
        return types.SimpleNamespace(loss=torch.zeros(()), out=self.q(self.p(x)))


def _toy_pair(seed=0):
    """The same AdaLoRA model in peft (init_r 3, lora_alpha 5) and in lorax."""
    torch.manual_seed(seed)
    config = peft.AdaLoraConfig(
        init_r=3,
        target_r=2,
        lora_alpha=5,
        target_modules=["p", "q"],
        total_step=20,
        orth_reg_weight=1.0,
        beta1=0.7,
        beta2=0.6,
    )
    torch_model = peft.get_peft_model(_Toy(), config).base_model  # the AdaLoraModel
    params = {
        n: {"kernel": jnp.asarray(getattr(torch_model.model, n).base_layer.weight.detach().T)}
        for n in ("p", "q")
    }
    tree = lorax.adalora(params, init_rank=3, target_rank=2, alpha=5)
    tree = _randomized(tree, seed)
    _to_torch(torch_model, tree)
    return torch_model, tree


def _to_torch(torch_model, tree):
    """lorax's a, e, b into peft's lora_A = a.T, lora_E = e[:, None], lora_B = b.T."""
    with torch.no_grad():
        for n in ("p", "q"):
            leaf, module = tree[n]["kernel"], getattr(torch_model.model, n)
            module.lora_A["default"].copy_(torch.tensor(np.asarray(leaf.a).T))
            module.lora_E["default"].copy_(torch.tensor(np.asarray(leaf.e)[:, None]))
            module.lora_B["default"].copy_(torch.tensor(np.asarray(leaf.b).T))


def _torch_field(torch_model, n, field, table=None):
    """peft's tensor of layer ``n``, in lorax's layout."""
    if table is None:
        value = getattr(getattr(torch_model.model, n), f"lora_{field}")["default"]
    else:
        value = table[f"{n}.lora_{field}.default"]
    value = value.detach().numpy()
    return value[:, 0] if field == "E" else value.T


def test_forward_and_regularizer_equal_peft():
    torch_model, tree = _toy_pair()
    x = np.random.default_rng(3).normal(size=(3, 6)).astype(np.float32)
    with torch.no_grad():
        out = torch_model(torch.tensor(x))
    fwd = lambda p, x: x @ p["p"]["kernel"] @ p["q"]["kernel"]  # noqa: E731
    with jax.default_matmul_precision("highest"):
        ours = jax.jit(lorax.lora(fwd))(tree, x)
    base = x @ np.asarray(tree["p"]["kernel"].base) @ np.asarray(tree["q"]["kernel"].base)
    assert np.abs(ours - base).max() > 0.1  # the adapter matters
    np.testing.assert_allclose(ours, out.out.numpy(), rtol=1e-5, atol=1e-5)
    # the loss of AdaLoraModel.forward is orth_reg_weight (1) times its regularization
    regularizer = jax.jit(lorax.orthogonal_regularizer)
    np.testing.assert_allclose(regularizer(tree), out.loss.item(), rtol=1e-5)
    np.testing.assert_allclose(regularizer(lorax.split(tree)[0]), out.loss.item(), rtol=1e-5)


def test_importance_and_mask_to_budget_equal_peft():
    torch_model, tree = _toy_pair(seed=4)
    allocator = torch_model.rankallocator
    state = lorax.AdaLoraState.init(tree)
    assert (state.init_budget, state.target_budget) == (allocator.init_bgt, allocator.target_bgt)
    rng = np.random.default_rng(5)
    for round_ in range(3):  # new weights and gradients each round, as after optimizer steps
        tree = _randomized(tree, 10 + round_)
        _to_torch(torch_model, tree)
        grads = {}
        for n in ("p", "q"):
            leaf, module = tree[n]["kernel"], getattr(torch_model.model, n)
            g = {f: rng.normal(size=getattr(leaf, f).shape).astype(np.float32) for f in "aeb"}
            grads[n] = {"kernel": leaf.replace(**{f: jnp.asarray(v) for f, v in g.items()})}
            module.lora_A["default"].grad = torch.tensor(g["a"].T)
            module.lora_E["default"].grad = torch.tensor(g["e"][:, None])
            module.lora_B["default"].grad = torch.tensor(g["b"].T)
        allocator.update_ipt(torch_model.model)
        state = jax.jit(lambda s, t, g: lorax.update_importance(s, t, g, beta1=0.7, beta2=0.6))(
            state, tree, grads
        )
    for n in ("p", "q"):
        for f in "AEB":
            for ours, theirs in (
                (state.sensitivity, allocator.exp_avg_ipt),
                (state.uncertainty, allocator.exp_avg_unc),
            ):
                want = _torch_field(torch_model, n, f, theirs)
                np.testing.assert_allclose(ours[n + "/kernel"][f.lower()], want, rtol=1e-5)
    for budget in (5, 4, 2):
        _to_torch(torch_model, tree)  # peft's mask_to_budget zeroes lora_E in place
        pattern = allocator.mask_to_budget(torch_model.model, budget)
        masked = jax.jit(lorax.mask_to_budget)(tree, state, budget)
        for n in ("p", "q"):
            kept = np.asarray(pattern[f"{n}.lora_E.default"])
            np.testing.assert_array_equal(np.asarray(masked[n]["kernel"].mask) > 0, kept)
            np.testing.assert_array_equal(masked[n]["kernel"].e, _torch_field(torch_model, n, "E"))
        assert sum(kept_ranks(masked).values()) == budget  # no ties in random scores
    # peft's score of each triplet: sensitivity x uncertainty of E, plus the means over A's
    # row and B's column
    scores = triplet_scores(state, tree["p"]["kernel"], "p/kernel")
    s = {f: allocator._element_score(f"p.lora_{f}.default").numpy() for f in "AEB"}
    want = allocator._combine_ipt(
        torch.tensor(s["E"]),
        torch.cat(
            [torch.tensor(s["A"]).mean(1, keepdim=True), torch.tensor(s["B"]).mean(0)[:, None]],
            1,
        ),
    )
    np.testing.assert_allclose(scores, want.numpy(), rtol=1e-5)


def _peft_budget(step, init, target, tinit, tfinal, total):
    fake = types.SimpleNamespace(
        peft_config=types.SimpleNamespace(tinit=tinit, tfinal=tfinal, total_step=total, deltaT=1),
        init_bgt=init,
        target_bgt=target,
    )
    return RankAllocator.budget_schedule(typing.cast(RankAllocator, fake), step)[0]


@st.composite
def _schedules(draw):
    init = draw(st.integers(1, 300))
    target = draw(st.integers(0, init))
    total = draw(st.integers(1, 60))
    tfinal = draw(st.integers(0, total - 1))
    tinit = draw(st.integers(0, total - tfinal - 1))
    return init, target, tinit, tfinal, total


@settings(max_examples=60, deadline=None)
@given(_schedules())
def test_budget_schedule_equals_peft(schedule):
    init, target, tinit, tfinal, total = schedule
    kw = dict(init_budget=init, target_budget=target, tinit=tinit, tfinal=tfinal, total_step=total)
    for step in range(total + 3):
        assert lorax.budget_at(step, **kw) == _peft_budget(step, *schedule)


@pytest.mark.parametrize("schedule", [(48, 32, 2, 2, 10), (300, 17, 0, 0, 7), (97, 8, 5, 11, 40)])
def test_budget_schedule_traced_equals_peft(schedule):
    init, target, tinit, tfinal, total = schedule
    kw = dict(init_budget=init, target_budget=target, tinit=tinit, tfinal=tfinal, total_step=total)
    steps = np.arange(-1, total + 3)
    got = jax.jit(jax.vmap(lambda s: lorax.budget_at(s, **kw)))(jnp.asarray(steps))
    want = [_peft_budget(int(s), *schedule) for s in steps]
    np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------- a jitted training loop
def test_training_loop_ends_at_the_target_budget_without_retracing():
    tree = _tree()
    trainable, frozen = lorax.split(tree)
    state = lorax.AdaLoraState.init(tree)
    assert (state.init_budget, state.target_budget) == (3 * 4, 2 * 4)  # 3 weights, 2 stacked
    schedule = dict(tinit=2, tfinal=3, total_step=12)
    budget_kw = dict(init_budget=state.init_budget, target_budget=state.target_budget, **schedule)
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(8, 6)).astype(np.float32))
    y = jnp.asarray(np.sin(rng.normal(size=(8, 8))).astype(np.float32))
    tx = optax.adam(3e-2)
    traces = []

    @jax.jit
    def step(trainable, frozen, opt_state, state, t):
        traces.append(1)

        def loss_fn(tr):
            out = lorax.lora(_model)(lorax.combine(tr, frozen), x)
            return jnp.mean((out - y) ** 2) + 0.1 * lorax.orthogonal_regularizer(tr)

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        # peft's update_and_allocate with deltaT = 1: importance until the final phase, then
        # a mask at every step (the ranks stay as they are once the scores stop changing)
        new = lorax.update_importance(state, trainable, grads)
        in_budget_phase = t < schedule["total_step"] - schedule["tfinal"]
        state = jax.tree.map(lambda n, o: jnp.where(in_budget_phase, n, o), new, state)
        tree = lorax.mask_to_budget(
            lorax.combine(trainable, frozen), state, lorax.budget_at(t, **budget_kw)
        )
        trainable, frozen = lorax.split(tree)
        return trainable, frozen, opt_state, state, loss

    opt_state = tx.init(trainable)
    losses, kept = [], []
    for t in range(schedule["total_step"] + 2):
        trainable, frozen, opt_state, state, loss = step(
            trainable, frozen, opt_state, state, jnp.asarray(t)
        )
        losses.append(float(loss))
        kept.append(sum(kept_ranks(lorax.combine(trainable, frozen)).values()))
        assert kept[-1] == lorax.budget_at(t, **budget_kw), (t, kept)
    assert len(traces) == 1  # one trace: shapes never change while ranks shrink
    assert kept[0] == 12 and kept[-1] == state.target_budget == 8
    assert losses[-1] < losses[0]
    ranks = lorax.summary(lorax.combine(trainable, frozen))
    assert sum(r.rank or 0 for r in ranks.rows) == 8 and "rank" in ranks.table()


def test_errors_name_what_is_wrong():
    tree = _tree()
    with pytest.raises(LoraxValueError, match="target_rank 4 exceeds init_rank 3"):
        lorax.adalora(_params(), init_rank=3, target_rank=4, targets=["proj"])
    with pytest.raises(LoraxValueError, match="init_rank 9 for 'proj/kernel' exceeds"):
        lorax.adalora(_params(), init_rank=9, target_rank=2, targets=["proj"])
    with pytest.raises(LoraxValueError, match="no AdaLoraWeight leaves"):
        lorax.orthogonal_regularizer(_params())
    state = lorax.AdaLoraState.init(tree)
    with pytest.raises(LoraxValueError, match="not one half"):
        lorax.mask_to_budget(lorax.split(tree)[0], state, 2)
    with pytest.raises(LoraxValueError, match="beta1 must be in"):
        lorax.update_importance(state, tree, tree, beta1=1.0)
    with pytest.raises(LoraxValueError, match="no budgeting phase"):
        lorax.budget_at(3, init_budget=4, target_budget=2, tinit=5, tfinal=0, total_step=5)


# --------------------------------------------------------------- peft interop on GPT-2
def test_adapters_to_and_from_peft_gpt2(tmp_path):
    from safetensors.numpy import load_file
    from test_models import _hf_gpt2, _tokens

    from lorax.models import gpt2

    base_dir = tmp_path / "base"
    _hf_gpt2().save_pretrained(base_dir)
    base = lambda: transformers_model(base_dir)  # noqa: E731
    torch.manual_seed(0)
    config = peft.AdaLoraConfig(
        init_r=4,
        target_r=2,
        lora_alpha=6,
        target_modules=["c_attn", "c_fc"],
        total_step=6,
        tinit=1,
        tfinal=2,
        fan_in_fan_out=True,
    )
    torch_model = peft.get_peft_model(base(), config)
    opt = torch.optim.AdamW([p for p in torch_model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.tensor(_tokens(2, 8, seed=5))
    for t in range(6):  # trains and prunes: 16 triplets down to 8
        torch_model(ids, labels=ids).loss.backward()
        opt.step()
        torch_model.base_model.update_and_allocate(t)
        opt.zero_grad()
    torch_model.eval()
    torch_model.save_pretrained(tmp_path / "theirs")
    pattern = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert sum(sum(v) for v in pattern["rank_pattern"].values()) == 8
    check = _tokens(2, 9, seed=6)
    with torch.no_grad():
        theirs = torch_model(torch.tensor(check)).logits.numpy()

    model, params = gpt2.from_pretrained(base_dir, scan_layers=True)
    tree = lorax.import_peft(tmp_path / "theirs", params, model="gpt2")
    leaf = tree["ScanLayers"]["attn"]["c_attn"]["kernel"]
    assert isinstance(leaf, lorax.AdaLoraWeight) and leaf.a.shape == (2, 32, 4)
    assert sum(kept_ranks(tree).values()) == 8
    apply = jax.jit(lorax.lora(model.apply))
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(apply({"params": tree}, check))
    unadapted = _randomized(tree, 0, keep=lambda p, s: np.zeros(s, bool))  # e = 0 everywhere
    with jax.default_matmul_precision("highest"):
        assert np.abs(ours - np.asarray(apply({"params": unadapted}, check))).max() > 1e-3
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)

    # and back: the same tensors and rank pattern
    lorax.export_peft(tmp_path / "again", tree, model="gpt2")
    again, original = (
        load_file(tmp_path / d / "adapter_model.safetensors") for d in ("again", "theirs")
    )
    assert sorted(again) == sorted(original)
    for k in original:
        np.testing.assert_allclose(again[k], original[k], rtol=0, atol=0)

    # an adapter of other values and masks made here loads in peft with the same logits
    made = lorax.adalora(params, init_rank=4, target_rank=2, alpha=6, targets=["c_attn", "c_fc"])
    assert jax.tree.structure(made) == jax.tree.structure(tree)  # (one compiled apply)
    made = _randomized(
        made, 7, keep=lambda p, s: np.random.default_rng(len(p)).random(s) < 0.6, scale=0.3
    )
    lorax.export_peft(tmp_path / "ours", made, model=model)
    loaded = peft.PeftModel.from_pretrained(base(), tmp_path / "ours").eval()
    with torch.no_grad():
        theirs = loaded(torch.tensor(check)).logits.numpy()
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(apply({"params": made}, check))
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def transformers_model(directory):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(directory).eval()


def test_state_is_a_pytree_with_static_budgets():
    state = lorax.AdaLoraState.init(_tree())
    leaves, treedef = jax.tree_util.tree_flatten(state)
    back = treedef.unflatten([x + 1 for x in leaves])
    assert len(leaves) == 18 and (back.init_budget, back.target_budget) == (12, 8)
    assert float(back.uncertainty["proj/kernel"]["e"][0]) == 1.0
    assert dataclasses.is_dataclass(back)
