"""A griffe extension for the API pages: reads lorax's docstrings as they are written.

lorax's docstrings are Google style with three habits that griffe reads otherwise: the
doctest section is titled ``Example:`` (griffe's section is ``Examples:``; the singular
would render as an admonition whose ``>>>`` lines become quotes); they use Sphinx roles
(``:class:`X```, ``:func:`f```), which Markdown would print verbatim; and a few end a line
with reST's ``::`` before an indented code block. This rewrites them when the docstrings
are loaded; the source files are not touched.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)
_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):`~?([^`]+)`")
_LITERAL = re.compile(r"(\S)::[ \t]*$", re.MULTILINE)  # "as follows::" before a code block


class LoraxDocstrings(griffe.Extension):
    """``Example:`` read as ``Examples:``, Sphinx roles as inline code, ``::`` as ``:``."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            text = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
            text = _LITERAL.sub(r"\1:", text)
            obj.docstring.value = _ROLE.sub(r"`\1`", text)
