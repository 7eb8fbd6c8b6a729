"""The errors lorax raises on bad input.

Every error that lorax raises for something the caller passed derives from
:class:`LoraxError`, and also from the builtin a caller would expect (``ValueError``,
``TypeError``, ``FileNotFoundError``, ``KeyError``), so ``except ValueError`` keeps working.
Messages name the argument or the parameter path that was wrong and what was expected.
"""

from __future__ import annotations


class LoraxError(Exception):
    """Base class of lorax's errors: ``except lorax.LoraxError`` catches every one."""


class LoraxValueError(LoraxError, ValueError):
    """An argument of the right type with a wrong value (shape, range, content)."""


class LoraxTypeError(LoraxError, TypeError):
    """An argument of the wrong type."""


class LoraxFileNotFoundError(LoraxError, FileNotFoundError):
    """A file or directory that lorax was asked to read is not there."""


class LoraxNotADirectoryError(LoraxError, NotADirectoryError):
    """A path that should be a directory is a file."""


class LoraxKeyError(LoraxError, KeyError):
    """A named tensor or entry is missing from a file."""

    def __str__(self) -> str:  # KeyError quotes its message; say it plainly
        return str(self.args[0]) if self.args else ""


class CheckpointError(LoraxValueError):
    """A checkpoint that cannot be written safely, or cannot be read as a valid one."""


class NonFiniteError(LoraxValueError):
    """A weight or a loss holds inf or NaN where a finite value is needed."""


class NotMergeableError(LoraxValueError):
    """A lorax leaf whose computation is not a weight (e.g. a bottleneck adapter)."""


class LoraxTiedWeightWarning(UserWarning):
    """One array object sits at several paths (tied weights) and each path got an adapter."""


class LoraxAmbiguousTargetWarning(UserWarning):
    """A weight that ``lorax.find_targets`` saw used both as a matmul weight and otherwise,
    so usage-chosen targets leave it out (the warning names its path and uses)."""
