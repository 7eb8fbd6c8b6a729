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
    public = {n for n in vars(lorax) if not n.startswith("_")
              and not inspect.ismodule(getattr(lorax, n))}
    assert public == set(lorax.__all__)


def test_version_comes_from_the_package_metadata():
    assert lorax.__version__ == importlib.metadata.version("lorax-peft")


def test_functions_do_not_shadow_modules():
    for name in ("wrap", "summary", "ia3", "quantize", "adapters", "stack"):
        assert callable(getattr(lorax, name)) and not inspect.ismodule(getattr(lorax, name))
        assert importlib.util.find_spec(f"lorax.{name}") is None, name


def test_the_package_is_typed():
    assert (pathlib.Path(lorax.__file__).parent / "py.typed").is_file()
