"""The documentation site: it builds in strict mode, and its reference pages are written from
the code (``docs/reference.py``, added to the site by ``docs/hooks.py``), so they change with it."""

from __future__ import annotations

import argparse
import dataclasses
import html
import importlib.util
import inspect
import io
import os
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _load_reference():
    spec = importlib.util.spec_from_file_location("autoprune_docs_reference", DOCS / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reference = _load_reference()


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """One strict build of the whole site for this module: (the finished process, the site)."""
    out = tmp_path_factory.mktemp("site")
    build = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(DOCS / "mkdocs.yml"), "-d", str(out)]
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    # from docs/, so that `python -m` puts no source tree ahead of the installed package on sys.path
    return subprocess.run(build, capture_output=True, text=True, cwd=DOCS, env=env, timeout=300), out


def _page(site, name: str) -> str:
    """The built HTML of ``reference/<name>.md`` (strict mode writes every page before it aborts)."""
    path = site[1] / "reference" / name / "index.html"
    assert path.is_file(), f"{path} was not built:\n{site[0].stderr[-3000:]}"
    return path.read_text()


@pytest.mark.slow
def test_the_site_builds_in_strict_mode(site):
    build, out = site
    assert build.returncode == 0, build.stderr[-5000:]
    for path in reference.PAGES:
        assert (out / path.removesuffix(".md") / "index.html").is_file(), path


@pytest.mark.slow
def test_the_cli_page_has_each_command_and_the_parsers_help(site):
    from autoprune.flags import build_parser

    page = _page(site, "cli")
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in sub.choices:
        assert f'id="{name}"' in page, name
    budget = next(a for a in sub.choices["prune"]._actions if "--budget-flops" in a.option_strings)
    expanded = argparse.HelpFormatter("autoprune")._expand_help(budget)
    assert "(default 0.5)" in expanded  # %(default)s was expanded, as `--help` shows it
    assert html.escape(expanded, quote=False) in page


@pytest.mark.slow
def test_every_criterion_method_searcher_space_and_task_has_a_section(site):
    import autoprune.search_spaces
    from autoprune.engine.criteria import CRITERIA
    from autoprune.engine.methods import METHODS
    from autoprune.engine.tasks import TASKS
    from autoprune.search.searchers import SEARCHERS

    for name, registry in [
        ("criteria", CRITERIA),
        ("methods", METHODS),
        ("searchers", SEARCHERS),
        ("spaces", autoprune.search_spaces.SPACES),
        ("tasks", TASKS),
    ]:
        page = _page(site, name)
        for entry in registry.names():
            assert f'id="{entry}"' in page, (name, entry)


@pytest.mark.slow
def test_the_api_page_documents_every_public_name(site):
    import autoprune
    from autoprune.engine.run import prune

    page = _page(site, "api")
    for name in autoprune.__all__:
        if name != "__version__":
            assert re.search(rf'id="autoprune[\w.]*\.{name}"', page), name
    assert " ".join(inspect.cleandoc(prune.__doc__).split()[:5]) in page  # its docstring
    assert ":class:" not in page and ":func:" not in page  # Sphinx roles read as plain code


def test_changing_a_flags_help_changes_the_cli_page():
    from autoprune.flags import build_parser

    parser = build_parser()
    old = reference.cli_page(parser)
    assert "keep at most this fraction of the FLOPs (default 0.5)" in old
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    changed = 0
    for command in sub.choices.values():
        for action in command._actions:
            if "--budget-flops" in action.option_strings:
                action.help = "keep this share|fraction of the FLOPs, %(default)s unless given"
                changed += 1
    assert changed == 2  # prune and search
    new = reference.cli_page(parser)
    assert "keep at most this fraction of the FLOPs" not in new
    assert new.count(r"keep this share\|fraction of the FLOPs, 0.5 unless given") == 2


def test_the_summary_page_lists_every_field_with_its_comment():
    from autoprune.search.summary import OPTIONAL, SCHEMA_VERSION, SearchSummary

    page = reference.summary_page()
    rows = {line.split(" | ")[0].strip("| `"): line for line in page.splitlines() if line.startswith("| `")}
    fields = [f.name for f in dataclasses.fields(SearchSummary)]
    assert list(rows) == fields
    for name in fields:
        assert ("| when present |" in rows[name]) == (name in OPTIONAL), name
    assert f"`schema_version` is `{SCHEMA_VERSION}`" in page
    # every comment among the class's fields (before its methods) reaches the page
    source = inspect.getsource(SearchSummary).split("\n    def ")[0]
    comments = [t.string for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT]
    flat = " ".join(page.replace("\\", "").split())
    for comment in comments:
        assert " ".join(comment.lstrip("#").split()) in flat, comment
    assert "the search's --name" in rows["name"]
    assert "the dense model: its task metrics" in rows["dense"]  # the comment after a wrapped annotation
    assert "the validation split that ranked the trials" in rows["validation"]  # comment lines above it
    assert "validation split" not in rows["latency_tables"]


@dataclasses.dataclass
class _Documented:
    """Fields documented every way ``reference.source_comments`` reads."""

    a: int = 1  # a's note that runs
    # on below
    b: int = 2  # b's own
    # c's note above
    c: int = 3
    d: int = 4  # d's note
    # (an aside of d's)
    e: int = dataclasses.field(
        default=5,
    )
    f: int = dataclasses.field(
        default=6,
    )  # f's note at the end  # noqa: E501


def test_source_comments_give_each_field_its_own():
    assert reference.source_comments(_Documented) == {
        "a": "a's note that runs on below",
        "b": "b's own",
        "c": "c's note above",
        "d": "d's note (an aside of d's)",
        "f": "f's note at the end",
    }


def test_policy_notes_stay_with_their_field():
    page = reference.policy_page()
    row = {line.split(" | ")[0].strip("| `"): line for line in page.splitlines() if line.startswith("| `")}
    assert "(channel pruning never prunes its outputs anyway)" in row["embedding"]
    assert "(channels rounded down)" in row["exact"]
    assert "a name from the method registry |" in row["method"]


def test_cells_escape_markdown_outside_code():
    assert reference.cell("a|b <cwd> fc* `x|y*`") == r"a\|b &lt;cwd> fc\* `x|y*`"
    assert reference.cell("see :class:`~autoprune.config.Policy`\n and :func:`get_task`") == (
        "see `Policy` and `get_task`"
    )


def test_reference_imports_neither_mkdocs_nor_autoprune():
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('r', {str(DOCS / 'reference.py')!r})\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mkdocs', 'autoprune', 'torch')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# What the README and the pages may not say: how the project is made (design pages outside the
# repository, who had which machine, the tools it was built with) or what the code once did.
MAKING = [
    r"\.\./shared",
    r"(?-i:\b(ARCHITECTURE|GOTCHAS|STYLE|PRUNING)\.md\b)",  # the design pages outside; not pruning.md
    r"\bdesign (folder|page|note)s?\b",
    r"\b(helper|sub-?agent|this) sessions?\b",
    r"\b(development|our|my|the makers'?) machines?\b",
    r"\bthis (2-core|shared|same|development) machine\b",
    r"\b(was|were|is|are) not (given|lent)\b",
    r"\bnot (been )?(measured|run) (yet|on a GPU)\b",
    r"\bhas not run on\b",
    r"\b(no longer|used to|previously|was added|were added|before .{1,40} existed)\b",
]
# The one way a machine is named (bench/_page.py machine()): "<CPU model>, <n> cores, <GPU or no GPU>".
HARDWARE = re.compile(r"\b(EPYC|Xeon|Ryzen|Core i[3579]|Apple M\d|NVIDIA|H100|H200|A100|RTX)\b")
MACHINE = re.compile(r"[\w ()-]+, \d+ cores?, (no GPU|[\w ()-]+)")


def _prose() -> list[Path]:
    return [ROOT / "README.md", *sorted((DOCS / "src").rglob("*.md"))]


def test_the_readme_and_pages_describe_the_product_not_its_making():
    found = []
    for path in _prose():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            found += [f"{path.relative_to(ROOT)}:{number}: {line.strip()}" for p in MAKING if re.search(p, line, re.I)]
    assert not found, "\n".join(found)


def test_hardware_is_named_one_way():
    odd = []
    for path in _prose():
        flat = " ".join(path.read_text().split())  # a name may wrap across lines
        named = [m.span() for m in MACHINE.finditer(flat)]
        for hit in HARDWARE.finditer(flat):
            if not any(a <= hit.start() < b for a, b in named):
                odd.append(f"{path.relative_to(ROOT)}: ...{flat[max(0, hit.start() - 60) : hit.end() + 60]}...")
    assert not odd, "\n".join(odd)


def test_the_phrase_test_catches_what_it_is_for():
    """The word lists above match the sentences they exist to keep out."""
    bad = [
        "The formulas are in `../shared/design/PRUNING.md`.",
        "Not measured yet: it has not run on a GPU.",
        "All figures on the development machine, 2 CPU cores (Intel Xeon).",
        "A policy file with `iterations` (as written before `method_options` existed) still reads.",
    ]
    for sentence in bad:
        assert any(re.search(p, sentence, re.I) for p in MAKING), sentence
    assert not MACHINE.search("2 cores of an Intel Xeon") and MACHINE.search("AMD EPYC, 2 cores, no GPU")
