"""The public surface: ``__all__``, the version, and no function hiding a module."""

import importlib
import importlib.metadata
import importlib.util
import inspect
import pathlib

import lorax


def test_all_lists_what_the_package_exports():
    assert len(set(lorax.__all__)) == len(lorax.__all__)
    for name in lorax.__all__:
        assert hasattr(lorax, name), name
    public = {
        n for n in vars(lorax) if not n.startswith("_") and not inspect.ismodule(getattr(lorax, n))
    }
    assert public == set(lorax.__all__)


def test_version_comes_from_the_package_metadata():
    assert lorax.__version__ == importlib.metadata.version("lorax-peft")


def test_functions_do_not_shadow_modules():
    for name in ("wrap", "summary", "ia3", "quantize", "adapters", "stack"):
        assert callable(getattr(lorax, name)) and not inspect.ismodule(getattr(lorax, name))
        assert importlib.util.find_spec(f"lorax.{name}") is None, name


def test_the_package_is_typed():
    assert (pathlib.Path(lorax.__file__).parent / "py.typed").is_file()


import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

P = {"dense": {"kernel": jnp.ones((8, 6)), "bias": jnp.zeros(6)}}


def test_old_keywords_warn_and_still_work():
    with pytest.warns(DeprecationWarning, match=r"pass dora=True"):
        old = lorax.wrap(P, rank=2, method="dora")
    assert type(old["dense"]["kernel"]) is lorax.DoraWeight
    new = lorax.wrap(P, rank=2, dora=True)
    np.testing.assert_array_equal(
        old["dense"]["kernel"].magnitude, new["dense"]["kernel"].magnitude
    )
    with pytest.warns(DeprecationWarning, match=r"pass targets="):
        old = lorax.unfreeze(P, select=["bias"])
    assert isinstance(old["dense"]["bias"], lorax.Unfrozen)
    with pytest.raises(TypeError, match="targets= only"):
        lorax.unfreeze(P, targets=["bias"], select=["bias"])
    trees = [lorax.wrap(P, rank=2, key=jax.random.key(i)) for i in range(2)]
    with pytest.warns(DeprecationWarning, match=r"pass combination="):
        old = lorax.add_weighted(trees, [0.5, 0.5], method="cat")
    new = lorax.add_weighted(trees, [0.5, 0.5], combination="cat")
    np.testing.assert_array_equal(old["dense"]["kernel"].a, new["dense"]["kernel"].a)


@pytest.mark.parametrize(
    "call",
    [
        lambda: lorax.wrap(P, 2),
        lambda: lorax.ia3(P, ["dense"]),
        lambda: lorax.adapters(P, ["dense"]),
        lambda: lorax.unfreeze(P, ["bias"]),
        lambda: lorax.quantize(P, "int8", 64),
        lambda: lorax.lora(lambda p: p, True),
        lambda: lorax.add_weighted([lorax.wrap(P, rank=2)], [1.0], "cat"),
    ],
)
def test_options_are_keyword_only(call):
    with pytest.raises(TypeError, match="positional argument"):
        call()


def test_first_arguments_are_positional():
    assert lorax.quantize(P, "int8")["dense"]["kernel"].kind == "int8"
    assert lorax.quantize(P, method="int8")["dense"]["kernel"].kind == "int8"
    with pytest.raises(TypeError, match="positional-only"):
        lorax.wrap(params=P, rank=2)
