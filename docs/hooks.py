"""mkdocs hooks: the reference pages written from the code (``docs/reference.py``) join the
site's files at build time, so ``nav`` finds them and no copy of them is kept in ``docs/src``."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

HERE = Path(__file__).resolve().parent
# a Sphinx role in a docstring (:class:`~a.b.C`) as mkdocstrings renders it: the role's name, then code
ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj|const):<code>(~?)([^<]*)</code>")


def _reference():
    """``docs/reference.py``, loaded by path (``docs`` is not a package), fresh on each build."""
    spec = importlib.util.spec_from_file_location("autoprune_docs_reference", HERE / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def on_files(files: Files, config) -> Files:
    """Add each page of ``reference.pages()``; a file of the same path in ``docs/src`` is an error."""
    for path, content in _reference().pages().items():
        if files.get_file_from_path(path) is not None:
            raise PluginError(f"docs/src/{path} exists, but that page is generated from the code: remove the file")
        files.append(File.generated(config, path, content=content))
    return files


def on_page_content(html: str, page, config, files) -> str:
    """Sphinx roles in the docstrings mkdocstrings rendered, as plain code: ``:class:`~a.b.C``` reads ``C``."""
    return ROLE.sub(lambda m: f"<code>{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}</code>", html)
