"""lorax.loraplus: B factors at ratio times A's learning rate, groups as peft forms them."""

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorax
from lorax.errors import LoraxValueError
from lorax.optim import loraplus_labels

pytestmark = pytest.mark.fast_compile  # compile-bound: small shapes (tests/conftest.py)


def _tree():
    params = {
        "embed_tokens": {"embedding": jnp.ones((16, 8))},
        "proj": {"kernel": jnp.ones((8, 6)), "bias": jnp.zeros(6)},
        "norm": {"scale": jnp.ones(8)},
    }
    lp = lorax.wrap(params, rank=2, targets=["embed_tokens", "proj"], key=jax.random.key(0))
    return lorax.unfreeze(lp, targets=r".*bias")


def _grads(tree, key):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten(
        [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    )


def test_sgd_moves_each_group_by_its_rate():
    lp = _tree()
    grads = _grads(lp, jax.random.key(1))
    tx = lorax.loraplus(optax.sgd, lp, learning_rate=0.1, ratio=8.0, embedding_learning_rate=0.01)
    updates: Any = tx.update(grads, tx.init(lp), lp)[0]
    proj, emb = updates["proj"]["kernel"], updates["embed_tokens"]["embedding"]
    g_proj, g_emb = grads["proj"]["kernel"], grads["embed_tokens"]["embedding"]
    np.testing.assert_allclose(proj.a, -0.1 * g_proj.a, rtol=1e-6)
    np.testing.assert_allclose(proj.b, -0.8 * g_proj.b, rtol=1e-6)
    np.testing.assert_allclose(emb.a, -0.01 * g_emb.a, rtol=1e-6)
    np.testing.assert_allclose(emb.b, -0.01 * g_emb.b, rtol=1e-6)
    # a trainable vector (an unfrozen bias) is in B's group, as in peft
    (u_bias,), (g_bias,) = (jax.tree.leaves(t["proj"]["bias"]) for t in (updates, grads))
    np.testing.assert_allclose(u_bias, -0.8 * g_bias, rtol=1e-6)
    for frozen in (proj.base, emb.base, updates["norm"]["scale"]):
        assert not np.any(np.asarray(frozen))


def test_adam_with_a_schedule_equals_adam_at_the_scaled_schedule():
    lp = _tree()
    schedule = optax.linear_schedule(1e-2, 1e-3, 10)
    tx = lorax.loraplus(optax.adam, lp, learning_rate=schedule, ratio=4.0)
    ref_a, ref_b = optax.adam(schedule), optax.adam(lambda c: 4.0 * schedule(c))
    state = tx.init(lp)
    a0, b0 = lp["proj"]["kernel"].a, lp["proj"]["kernel"].b
    sa, sb = ref_a.init(a0), ref_b.init(b0)
    for i in range(3):
        grads = _grads(lp, jax.random.key(10 + i))
        updates: Any
        updates, state = tx.update(grads, state, lp)
        ua: Any
        ub: Any
        ua, sa = ref_a.update(grads["proj"]["kernel"].a, sa)
        ub, sb = ref_b.update(grads["proj"]["kernel"].b, sb)
        np.testing.assert_allclose(updates["proj"]["kernel"].a, ua, rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(updates["proj"]["kernel"].b, ub, rtol=1e-5, atol=1e-8)


def test_groups_are_peft_create_loraplus_optimizer_groups():
    """The same model adapted in peft and in lorax: every adapter array in the same group."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer

    from lorax.models import llama

    hf: dict[str, Any] = dict(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf))
    modules = ["embed_tokens", "q_proj", "down_proj"]
    pm = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=modules))
    opt = create_loraplus_optimizer(pm, torch.optim.SGD, lr=1.0, loraplus_lr_ratio=16.0)
    by_id = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    rate = {"a": 1.0, "b": 16.0, "embedding": 1e-6}
    want = {}
    for name, p in pm.named_parameters():
        if p.requires_grad:  # e.g. ...layers.0.self_attn.q_proj.lora_A.default.weight
            m = re.search(r"(\w+)\.lora_(?:embedding_)?([AB])", name)
            assert m, name
            want[(m.group(1), m.group(2).lower())] = by_id[id(p)]

    model = llama.Llama(llama.LlamaConfig(**hf))
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    lp = lorax.wrap(params, rank=2, targets=modules)
    got = {}
    labels = loraplus_labels(lp)
    for path, label in jax.tree_util.tree_flatten_with_path(labels)[0]:
        if label != "frozen":
            names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
            got[(names[-3], names[-1])] = rate[label]
    assert got == want


def test_bad_input():
    lp = _tree()
    bad: tuple[Any, ...] = (0.0, -2.0, float("nan"), float("inf"), True, "16")
    for ratio in bad:
        with pytest.raises(LoraxValueError, match="ratio"):
            lorax.loraplus(optax.sgd, lp, learning_rate=0.1, ratio=ratio)
    with pytest.raises(LoraxValueError, match="no trainable"):
        lorax.loraplus(optax.sgd, {"w": jnp.ones((4, 4))}, learning_rate=0.1)
