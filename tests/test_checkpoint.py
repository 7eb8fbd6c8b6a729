"""Adapter checkpoints (orbax): exact round trips, no base weights on disk, step-numbered
checkpoints with a CheckpointManager, a failed save that leaves the last good one, and
errors that name the path."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import randomize_b

import lorax
from lorax.models import gpt2

pytestmark = pytest.mark.fast_compile  # compile-bound: small shapes (tests/conftest.py)


def _small():
    params = {
        "attn": {"kernel": jax.random.normal(jax.random.key(0), (16, 24)), "bias": jnp.zeros(24)},
        "stack": {"kernel": jax.random.normal(jax.random.key(1), (3, 16, 8))},
        "norm": {"scale": jnp.ones(16)},
    }
    lp = lorax.wrap(
        params,
        rank=4,
        alpha=8,
        key=jax.random.key(2),
        stacked=r"stack/.*",
        rank_pattern={"stack": 2},
    )
    return params, randomize_b(lp, jax.random.key(3))


def _shifted(lp, by):
    """``lp`` with its adapter arrays (not its base) shifted by ``by``."""
    trainable, frozen = lorax.split(lp)
    return lorax.combine(jax.tree.map(lambda x: x + by, trainable), frozen)


def _same(x, y):
    assert jax.tree.structure(x) == jax.tree.structure(y)
    for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def test_round_trip_is_exact(tmp_path):
    params, lp = _small()
    lorax.save(tmp_path / "ckpt", lp)
    _same(lorax.load(tmp_path / "ckpt", params), lp)
    # onto an NF4 base too: the adapter is independent of how the base is stored
    q = lorax.quantize(params, "nf4", targets=["attn"])
    loaded = lorax.load(tmp_path / "ckpt", q)
    assert isinstance(loaded["attn"]["kernel"].base, lorax.NF4Weight)
    np.testing.assert_array_equal(loaded["attn"]["kernel"].b, lp["attn"]["kernel"].b)


def test_gpt2_124m_checkpoint_holds_only_the_adapter(tmp_path):
    """GPT-2 124M shape, r=8 on every block projection: bytes on disk within 10% of the
    adapter arrays' bytes (the 500 MB of base weights are not written)."""
    model = gpt2.GPT2(gpt2.CONFIGS["gpt2"])
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["params"])
    lp = lorax.wrap(params, rank=8, targets=["c_attn", "c_proj", "c_fc"])
    lp = randomize_b(lp, jax.random.key(1))  # zeros would compress below the array bytes
    trainable, _ = lorax.split(lp)
    adapter_bytes = sum(x.nbytes for x in jax.tree.leaves(trainable))
    lorax.save(tmp_path / "gpt2", lp)
    disk = sum(f.stat().st_size for f in (tmp_path / "gpt2").rglob("*") if f.is_file())
    assert abs(disk - adapter_bytes) < 0.10 * adapter_bytes, (disk, adapter_bytes)
    assert sum(x.nbytes for x in jax.tree.leaves(params)) > 100 * disk


def test_checkpoint_manager_steps(tmp_path):
    params, lp = _small()
    options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=True)
    with ocp.CheckpointManager(tmp_path / "run", options=options) as manager:
        versions = {}
        for step in range(4):
            versions[step] = _shifted(lp, step)
            lorax.save(manager, versions[step], step=step)
        manager.wait_until_finished()
        assert manager.all_steps() == [2, 3] and manager.latest_step() == 3
        _same(lorax.load(manager, params), versions[3])
        _same(lorax.load(manager, params, step=2), versions[2])
        with pytest.raises(FileNotFoundError, match="step 0"):
            lorax.load(manager, params, step=0)


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    params, lp = _small()
    with ocp.CheckpointManager(tmp_path / "run") as manager:
        lorax.save(manager, lp, step=1)
        manager.wait_until_finished()

    def crash(*args, **kwargs):  # the process dies while writing the metadata item
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "save", crash)
    monkeypatch.setattr(ocp.JsonCheckpointHandler, "async_save", crash, raising=False)
    sync = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
    with pytest.raises(KeyboardInterrupt):
        with ocp.CheckpointManager(tmp_path / "run", options=sync) as manager:
            lorax.save(manager, _shifted(lp, 100), step=2)
            manager.wait_until_finished()
    monkeypatch.undo()
    with ocp.CheckpointManager(tmp_path / "run") as manager:  # a fresh process's view
        assert manager.latest_step() == 1
        _same(lorax.load(manager, params), lp)


def test_errors_name_the_path(tmp_path):
    params, lp = _small()
    lorax.save(tmp_path / "ckpt", lp)
    wrong = {**params, "attn": {**params["attn"], "kernel": jnp.zeros((16, 32))}}
    with pytest.raises(ValueError, match=r"'attn/kernel'.*\(16, 24\).*\(16, 32\)"):
        lorax.load(tmp_path / "ckpt", wrong)
    with pytest.raises(ValueError, match=r"\['stack/kernel'\].*does not have"):
        lorax.load(tmp_path / "ckpt", {k: v for k, v in params.items() if k != "stack"})
    with pytest.raises(ValueError, match="already has an adapter"):
        lorax.load(tmp_path / "ckpt", lp)
    with pytest.raises(FileNotFoundError):
        lorax.load(tmp_path / "nothing", params)
    foreign = tmp_path / "foreign"
    with ocp.StandardCheckpointer() as c:
        c.save(foreign, {"x": jnp.ones(3)})
    with pytest.raises(ValueError, match="not a lorax adapter checkpoint"):
        lorax.load(foreign, params)
    for f in (tmp_path / "ckpt" / "adapter").rglob("*"):  # corrupt the array files
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
            f.write_bytes(b"\0" * 7)
    with pytest.raises(ValueError, match="corrupt or incomplete"):
        lorax.load(tmp_path / "ckpt", params)
    with pytest.raises(ValueError, match="no adapter leaves"):
        lorax.save(tmp_path / "x", params)
    trainable, _ = lorax.split(lp)
    with pytest.raises(ValueError, match="combine"):
        lorax.save(tmp_path / "y", lorax.split(lp)[1])
    del trainable


# ------------------------------------------------------------------------- add_weighted


def _delta(leaf):
    return np.asarray(lorax.merge({"w": leaf})["w"], np.float64) - np.asarray(leaf.base, np.float64)


def _adapters():
    base = {"w": jax.random.normal(jax.random.key(0), (12, 10))}
    t1 = randomize_b(lorax.wrap(base, rank=3, alpha=6, key=jax.random.key(1)), jax.random.key(2))
    t2 = randomize_b(lorax.wrap(base, rank=2, alpha=1, key=jax.random.key(3)), jax.random.key(4))
    return t1, t2


@pytest.mark.parametrize("weights", [(0.7, 0.3), (1.0, -0.5)])
def test_add_weighted_cat_is_the_weighted_sum(weights):
    t1, t2 = _adapters()
    out = lorax.add_weighted([t1, t2], weights, combination="cat")
    assert out["w"].rank == 5
    want = weights[0] * _delta(t1["w"]) + weights[1] * _delta(t2["w"])
    np.testing.assert_allclose(_delta(out["w"]), want, atol=1e-5)


def test_add_weighted_linear():
    t1, t2 = _adapters()
    one = lorax.add_weighted([t1], [0.4], combination="linear")
    np.testing.assert_allclose(_delta(one["w"]), 0.4 * _delta(t1["w"]), atol=1e-5)
    # two adapters: peft's definition, (sum_i c_i A_i)(sum_i c_i B_i), c_i = sqrt(w_i s_i)
    leaf = t1["w"]
    t3 = randomize_b(
        lorax.wrap({"w": leaf.base}, rank=3, alpha=2, key=jax.random.key(7)), jax.random.key(6)
    )
    two = lorax.add_weighted([t1, t3], [0.5, 0.25], combination="linear")
    c1, c3 = np.sqrt(0.5 * leaf.scale), np.sqrt(0.25 * t3["w"].scale)
    a = c1 * np.asarray(leaf.a, np.float64) + c3 * np.asarray(t3["w"].a, np.float64)
    b = c1 * np.asarray(leaf.b, np.float64) + c3 * np.asarray(t3["w"].b, np.float64)
    np.testing.assert_allclose(_delta(two["w"]), a @ b, atol=1e-5)
    with pytest.raises(ValueError, match="equal ranks"):
        lorax.add_weighted([t1, t2], [0.5, 0.5], combination="linear")


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_add_weighted_svd_is_the_best_rank_r_approximation(rank):
    t1, t2 = _adapters()
    out = lorax.add_weighted([t1, t2], [0.6, 0.9], combination="svd", rank=rank)
    target = 0.6 * _delta(t1["w"]) + 0.9 * _delta(t2["w"])
    u, s, vt = np.linalg.svd(target)
    best = (u[:, :rank] * s[:rank]) @ vt[:rank]  # Eckart-Young
    assert out["w"].rank == rank
    np.testing.assert_allclose(_delta(out["w"]), best, atol=1e-4)


def test_add_weighted_stacked_and_errors():
    params, lp = _small()
    other = randomize_b(
        lorax.wrap(
            params, rank=4, key=jax.random.key(9), stacked=r"stack/.*", rank_pattern={"stack": 2}
        ),
        jax.random.key(8),
    )
    out = lorax.add_weighted([lp, other], [1.0, 1.0], combination="svd", rank=2)
    for layer in range(3):
        a = lorax.merge(lp)["stack"]["kernel"][layer] - params["stack"]["kernel"][layer]
        b = lorax.merge(other)["stack"]["kernel"][layer] - params["stack"]["kernel"][layer]
        got = lorax.merge(out)["stack"]["kernel"][layer] - params["stack"]["kernel"][layer]
        u, s, vt = np.linalg.svd(np.asarray(a + b, np.float64))
        np.testing.assert_allclose(got, (u[:, :2] * s[:2]) @ vt[:2], atol=1e-4)
    with pytest.raises(ValueError, match="combination"):
        lorax.add_weighted([lp], [1.0], combination="ties")
    with pytest.raises(ValueError, match="one weight per tree"):
        lorax.add_weighted([lp, other], [1.0])
    with pytest.raises(ValueError, match="another structure"):
        lorax.add_weighted([lp, {"x": 1}], [1.0, 1.0])


def _edit_metadata(path, edit, keep_digest=False):
    file = path / "lorax" / "metadata"
    metadata = json.loads(file.read_text())
    edit(metadata["leaves"]["attn/kernel"])
    if not keep_digest:
        metadata.pop("digest")
    file.write_text(json.dumps(metadata))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda e: e["static"].update(scale=3.0), "digest"),  # any edit breaks the digest
    ],
)
def test_edited_checkpoint_breaks_its_digest(tmp_path, edit, message):
    params, lp = _small()
    lorax.save(tmp_path / "ckpt", lp)
    _edit_metadata(tmp_path / "ckpt", edit, keep_digest=True)
    with pytest.raises(lorax.CheckpointError, match=message):
        lorax.load(tmp_path / "ckpt", params)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda e: e["static"].update(scale="2"), "'attn/kernel'.*scale.*finite number"),
        (lambda e: e["static"].update(scale=float("nan")), "'attn/kernel'.*scale.*finite"),
        (lambda e: e["static"].update(scale=0.0), "'attn/kernel'.*nonzero scale"),
        (lambda e: e["static"].update(dropout=1.5), "'attn/kernel'.*dropout"),
        (lambda e: e["static"].update(rank=4), "'attn/kernel'.*static fields"),
        (lambda e: e.update(kind="DoraWeight"), "'attn/kernel'.*DoraWeight saves"),
        (lambda e: e.update(kind="Nope"), "'attn/kernel'.*'Nope'.*does not know"),
        (lambda e: e["fields"]["a"].update(dtype="int32"), "'attn/kernel'.*floating"),
        (lambda e: e["fields"]["a"].update(shape=[16, 5]), "cannot be read.*16, 5"),
        (lambda e: e.update(base_shape="16x24"), "'attn/kernel'.*base the shape"),
    ],
)
def test_edited_metadata_without_digest_is_validated(tmp_path, edit, message):
    """Checkpoints written before digests (or crafted) are still checked field by field."""
    params, lp = _small()
    lorax.save(tmp_path / "ckpt", lp)
    _edit_metadata(tmp_path / "ckpt", edit)
    with pytest.raises(lorax.CheckpointError, match=message):
        lorax.load(tmp_path / "ckpt", params)


def test_corrupt_array_bytes_are_refused(tmp_path):
    params, lp = _small()
    lorax.save(tmp_path / "ckpt", lp)
    chunks = sorted(
        (tmp_path / "ckpt" / "adapter" / "d").iterdir(), key=lambda f: f.stat().st_size
    )  # the arrays' data files
    data = bytearray(chunks[-1].read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunks[-1].write_bytes(bytes(data))
    with pytest.raises(lorax.CheckpointError, match="corrupt"):
        lorax.load(tmp_path / "ckpt", params)


def test_adapter_on_an_integer_base_is_refused(tmp_path):
    params, lp = _small()
    lorax.save(tmp_path / "ckpt", lp)
    ints = {**params, "attn": {**params["attn"], "kernel": jnp.zeros((16, 24), jnp.int8)}}
    with pytest.raises(lorax.LoraxError, match="base at 'attn/kernel' is int8"):
        lorax.load(tmp_path / "ckpt", ints)


def test_factors_that_do_not_fit_their_base_are_refused(tmp_path):
    """Arrays that agree with their metadata but not with the base's layout (a crafted or
    mislabelled checkpoint) fail at load with the path, as lorax.combine would."""
    base = {"attn": {"kernel": jnp.zeros((16, 24))}}
    crafted = {
        "attn": {
            "kernel": lorax.LoraWeight(base["attn"]["kernel"], jnp.ones((16, 4)), jnp.ones((4, 20)))
        }
    }
    lorax.save(tmp_path / "ckpt", crafted)
    with pytest.raises(lorax.CheckpointError, match=r"'attn/kernel'.*\(4, 20\).*do not fit"):
        lorax.load(tmp_path / "ckpt", base)


def test_adalora_round_trip_keeps_its_masks(tmp_path):
    """A leaf with frozen state of its own (AdaLoRA's rank mask) is saved whole: the pruned
    triplets stay pruned after a reload."""
    params = {"w": jax.random.normal(jax.random.key(0), (8, 6)), "b": jnp.zeros(6)}
    tree = lorax.adalora(params, init_rank=4, target_rank=2, key=jax.random.key(1))
    leaf = tree["w"]
    mask = jnp.array([1.0, 0.0, 1.0, 0.0])
    tree = {**tree, "w": leaf.replace(e=jnp.arange(1.0, 5.0) * mask, mask=mask)}
    lorax.save(tmp_path / "ada", tree)
    back = lorax.load(tmp_path / "ada", params)["w"]
    assert isinstance(back, lorax.AdaLoraWeight)
    for name in ("a", "e", "b", "mask"):
        np.testing.assert_array_equal(getattr(back, name), getattr(tree["w"], name))
    np.testing.assert_array_equal(lorax.merge({"w": back})["w"], lorax.merge(tree)["w"])
    with pytest.raises(ValueError, match="combined"):  # the trainable half lacks the mask
        lorax.save(tmp_path / "half", lorax.split(tree)[0])
