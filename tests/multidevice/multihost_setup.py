"""The model, data and train step shared by tests/test_multihost.py and its worker."""

import contextlib

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

import lorax
from lorax.models import gpt2, partitioning


def setup():
    cfg = gpt2.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    model = gpt2.GPT2(cfg, scan_layers=True)
    ids = jax.random.randint(jax.random.key(3), (8, 9), 0, 64)
    params = model.init(jax.random.key(0), ids[:, :-1])["params"]
    return model, lorax.wrap(params, rank=4, alpha=8, key=jax.random.key(1)), ids


def train(model, lp, ids, mesh=None, rules=None, steps=3):
    """AdamW steps on the adapters; on a mesh the inputs are placed with the derived specs
    (from every process: lorax.shard keeps each process's shards)."""
    apply = lorax.lora(model.apply)

    def loss_fn(t, f, ids):
        logits = apply({"params": lorax.combine(t, f)}, ids[:, :-1])
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean()

    opt = optax.adamw(1e-2)
    trainable, frozen = lorax.split(lp)
    out_shardings = None
    if mesh is not None:
        specs = lorax.partition_specs(lp, partitioning.logical_axes(lp), rules=rules, mesh=mesh)
        trainable, frozen = lorax.split(lorax.shard(lp, specs, mesh=mesh))
        t_specs, _ = lorax.split(specs)
        out_shardings = (jax.tree.map(lambda s: NamedSharding(mesh, s), t_specs), None, None)
        ids = lorax.shard(ids, partitioning.batch_spec(mesh), mesh=mesh)
    state = opt.init(trainable)

    def step(t, f, s, ids):
        loss, g = jax.value_and_grad(loss_fn)(t, f, ids)
        upd, s = opt.update(g, s, t)
        return optax.apply_updates(t, upd), s, loss

    step = jax.jit(step, out_shardings=out_shardings)
    losses = []
    scope = partitioning.sharded(mesh, rules) if mesh is not None else contextlib.nullcontext()
    with scope:  # traced with the rules: the models keep activations split over the batch
        for _ in range(steps):
            trainable, state, loss = step(trainable, frozen, state, ids)
            losses.append(float(lorax.io.checkpoint.host_value(loss)))
    return trainable, losses
