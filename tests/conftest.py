import os

# Eight simulated CPU devices for the sharding tests (set before jax starts its backend).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import jax  # noqa: E402
import pytest  # noqa: E402

# As equinox's tests: surface silent rank broadcasting bugs. Strict dtype promotion is
# switched on around lorax's own computations (helpers.check_lora_equals_merged), since
# optax does not support it.
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(autouse=True)
def _no_densify(recwarn):
    """No test may densify a LoRA leaf silently: densify warnings fail unless expected."""
    yield
    import lorax

    bad = [w for w in recwarn.list if issubclass(w.category, lorax.LoraxDensifyWarning)]
    assert not bad, f"unexpected densify warnings: {[str(w.message) for w in bad]}"
