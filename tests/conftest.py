import jax
import pytest

# As equinox's tests: surface silent dtype promotion and rank broadcasting bugs.
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(autouse=True)
def _no_densify(recwarn):
    """No test may densify a LoRA leaf silently: densify warnings fail unless expected."""
    yield
    import lorax

    bad = [w for w in recwarn.list if issubclass(w.category, lorax.LoraxDensifyWarning)]
    assert not bad, f"unexpected densify warnings: {[str(w.message) for w in bad]}"
