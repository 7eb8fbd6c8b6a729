import os

import jax
import pytest

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


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "fast_compile: the module's programs compile with jax_disable_most_optimizations "
        "(XLA's backend at -O0, as the multi-device and documentation processes run)",
    )


@pytest.fixture(autouse=True, scope="module")
def _fast_compile(request):
    """A module marked ``pytestmark = pytest.mark.fast_compile`` compiles its programs with
    jax_disable_most_optimizations: the same optimised HLO (so the same operations and
    FLOPs), LLVM's code generation at -O0 and without its expensive passes. Its tests
    compile small shapes many times and run them briefly, so compiling is most of their
    time; the flag about halves it. Module-scoped, so that the module's fixtures compile
    under it too."""
    if request.node.get_closest_marker("fast_compile") is None:
        yield
        return
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", before)


# tests/multidevice needs 8 devices: tests/test_multidevice.py runs it in a process of its
# own with 8 simulated CPU devices (one device here keeps every other test's numerics as on
# a plain machine). On a machine with 8 devices it is collected directly as well.
collect_ignore = [] if len(jax.devices()) >= 8 else ["multidevice"]
# tests/background runs in a process of its own too (tests/test_background.py), beside the
# rest; the child sets LORAX_TESTS_IN_BACKGROUND and collects it.
if not os.environ.get("LORAX_TESTS_IN_BACKGROUND"):
    collect_ignore.append("background")


_WAITING = ("test_multidevice.py::", "test_background.py::", "test_docs.py::test_python_blocks_run")


def pytest_collection_modifyitems(session, config, items):
    """The tests that wait on a background process run last, when it has had the time of
    the whole suite to finish."""
    items.sort(key=lambda item: any(w in item.nodeid for w in _WAITING))


def pytest_collection_finish(session):
    """Starts that process, tests/background's and the one that runs the documentation's
    code as soon as the run knows it will need them: they compile beside this process's
    tests (tests/test_multidevice.py, tests/test_background.py and tests/test_docs.py wait
    for them)."""
    if session.config.option.collectonly:
        return
    if any(item.nodeid.startswith("tests/test_multidevice.py") for item in session.items):
        import test_multidevice

        test_multidevice.start()
    if any("test_background.py::" in item.nodeid for item in session.items):
        import test_background

        test_background.start()
    if any("test_docs.py::test_python_blocks_run" in item.nodeid for item in session.items):
        import test_docs

        test_docs.start()
