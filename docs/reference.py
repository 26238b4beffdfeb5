"""The reference pages of the documentation, written from the code when the site is built.

:func:`pages` maps each page's path under ``docs/src`` to its markdown; ``docs/hooks.py`` adds
them to the site, so a flag's help, a registry entry or a documented field shows up as the code
has it. Importing this file imports nothing of autoprune; each page imports what it describes.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import itertools
import json
import re
import textwrap
import tokenize
from collections.abc import Callable, Iterable
from typing import Any

_CODE = re.compile(r"(`+)(.+?)\1", re.S)  # a code span, single or double backticks
_ROLE = re.compile(r":[\w:]+:`(~?)([^`]+)`")  # a Sphinx role, :class:`~a.b.C`


def _outside_code(text: str, change: Callable[[str], str]) -> str:
    """``text`` with ``change`` applied to what is not inside a code span."""
    out, at = [], 0
    for m in _CODE.finditer(text):
        out += [change(text[at : m.start()]), m.group(0)]
        at = m.end()
    return "".join([*out, change(text[at:])])


def cell(text: Any) -> str:
    """Text for a table cell or one line of prose: one line, markdown's special characters
    escaped outside code spans (a ``|`` in a code span is left to the tables extension)."""
    text = " ".join(_ROLE.sub(_role, str(text)).split())
    return _outside_code(text, lambda s: re.sub(r"([\\*_\[\]|])", r"\\\1", s).replace("<", "&lt;"))


def code(value: Any) -> str:
    """``value`` as a code span."""
    text = " ".join(str(value).split())
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _role(m: re.Match) -> str:
    name = m.group(2).lstrip(".")
    return f"`{name.rsplit('.', 1)[-1] if m.group(1) else name}`"


def prose(doc: str | None) -> str:
    """A docstring as markdown paragraphs: dedented, Sphinx roles as code spans."""
    if not doc:
        return ""
    return _outside_code(_ROLE.sub(_role, inspect.cleandoc(doc)), lambda s: s.replace("<", "&lt;"))


def first_sentence(doc: str | None) -> str:
    text = " ".join(prose(doc).split())
    m = re.search(r"(?<=[.:;])\s+(?=[A-Z(`])", text)
    return text[: m.start()] if m else text


def table(header: Iterable[str], rows: Iterable[Iterable[str]]) -> str:
    """A markdown table; the cells must already be :func:`cell` or :func:`code` text."""
    header = list(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(c or " " for c in row) + " |" for row in rows]
    return "\n".join(lines)


def page(title: str, source: str, *parts: str) -> str:
    note = f"*This page is generated from `{source}` when the site is built: change the code, not the page.*"
    return "\n\n".join([f"# {title}", note, *(p.strip("\n") for p in parts if p)]) + "\n"


YES = ("no", "yes")  # YES[flag]


def json_value(value: Any) -> str:
    return code(json.dumps(value, default=repr))


def source_comments(obj: Any) -> dict[str, str]:
    """The comments that document each field or assignment of a class (or module) ``obj``, by
    name: comments on the statement's own lines, comment lines directly above it and, for a
    statement with a comment on its line, the comment lines directly below it that continue
    that comment: no next field claims them, or they open with "(", or it left a "(" open."""
    source = textwrap.dedent(inspect.getsource(obj))
    tree = ast.parse(source)
    body = tree.body if inspect.ismodule(obj) else tree.body[0].body
    lines = source.splitlines()
    tool = re.compile(r"\s*#\s*(noqa|type:|pragma|fmt:).*")  # a linter's or formatter's, not the reader's
    found = {
        t.start[0]: tool.sub("", t.string).lstrip("#").strip()
        for t in tokenize.generate_tokens(io.StringIO(source).readline)
        if t.type == tokenize.COMMENT and tool.sub("", t.string)
    }
    alone = sorted(n for n in found if lines[n - 1].lstrip().startswith("#"))
    names = [_target(node) for node in body]
    own = [[found[n] for n in range(node.lineno, node.end_lineno + 1) if n in found] for node in body]
    above, below = [[] for _ in body], [[] for _ in body]
    for _, group in itertools.groupby(enumerate(alone), lambda pair: pair[1] - pair[0]):  # blocks of comment lines
        run = [n for _, n in group]
        block, start, stop = [found[n] for n in run], run[0], run[-1] + 1
        i = next((k for k, node in enumerate(body) if node.lineno > start), len(body))  # the statement after it
        after = i < len(body) and stop == body[i].lineno and names[i]
        before = i > 0 and body[i - 1].end_lineno == start - 1 and names[i - 1] and own[i - 1]
        text = " ".join(own[i - 1]) if before else ""
        if before and (not after or own[i] or block[0].startswith("(") or text.count("(") > text.count(")")):
            below[i - 1] += block
        elif after:
            above[i] += block
    notes = {name: " ".join(above[i] + own[i] + below[i]) for i, name in enumerate(names) if name}
    return {name: note for name, note in notes.items() if note}


def _target(node: ast.stmt) -> str | None:
    targets = [node.target] if isinstance(node, ast.AnnAssign) else getattr(node, "targets", [])
    return targets[0].id if len(targets) == 1 and isinstance(targets[0], ast.Name) else None


def type_text(annotation: Any) -> str:
    return code(annotation if isinstance(annotation, str) else getattr(annotation, "__name__", annotation))


def default_text(f: dataclasses.Field, show: Callable[[Any], str] = lambda v: code(repr(v))) -> str:
    """A field's default: ``show(value)``, an empty container from its factory, ``Factory()``
    for another factory, or "required"."""
    factory = f.default_factory
    if factory is dataclasses.MISSING:
        return "required" if f.default is dataclasses.MISSING else show(f.default)
    return show(factory()) if factory in (dict, list, tuple, set) else code(f"{factory.__name__}()")


def cli_page(parser: argparse.ArgumentParser | None = None) -> str:
    """The command line, from ``parser`` (default ``autoprune.flags.build_parser()``)."""
    if parser is None:
        from autoprune.flags import build_parser

        parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in sub._choices_actions}
    rows = [(f"[`{name}`](#{name})", cell(helps.get(name) or "")) for name in sub.choices]
    parts = [cell(parser.description or ""), _usage(parser), table(["Command", "What it does"], rows)]
    parts.append(_arguments(parser, skip=sub))
    for name, command in sub.choices.items():
        parts += [f"## {name}", cell(command.description or helps.get(name) or ""), _usage(command)]
        parts.append(_arguments(command))
    parts.append("Every command also takes `-h`/`--help`, which prints its usage and arguments.")
    return page("Command line", "autoprune.flags.build_parser()", *parts)


def _usage(parser: argparse.ArgumentParser) -> str:
    formatter = argparse.HelpFormatter(parser.prog, width=100)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    return "```text\n" + formatter.format_help().strip() + "\n```"


def _arguments(parser: argparse.ArgumentParser, skip: argparse.Action | None = None) -> str:
    """A table per argument group of ``parser``, and which arguments exclude each other."""
    formatter, parts = argparse.HelpFormatter(parser.prog), []
    hidden = [skip, *(a for a in parser._actions if a.help == argparse.SUPPRESS or isinstance(a, argparse._HelpAction))]
    for group in parser._action_groups:
        if rows := [_argument_row(formatter, a) for a in group._group_actions if not any(a is h for h in hidden)]:
            parts += [f"**{cell(group.title)}**", table(["Argument", "Help", "Default", "Choices"], rows)]
    for exclusive in parser._mutually_exclusive_groups:
        flags = ", ".join(code(a.option_strings[0]) for a in exclusive._group_actions)
        parts.append(f"At most one of {flags} is given.")
    return "\n\n".join(parts)


def _argument_row(formatter: argparse.HelpFormatter, action: argparse.Action) -> list[str]:
    if action.option_strings:
        metavar = f" {action.metavar}" if isinstance(action.metavar, str) and action.nargs != 0 else ""
        name = ", ".join(code(o + metavar) for o in action.option_strings)
    else:
        name = code(action.metavar or action.dest)
    help = formatter._expand_help(action) if action.help else ""
    default = action.default
    hidden = default is None or default == argparse.SUPPRESS or isinstance(action, argparse._VersionAction)
    shown = "" if hidden else code(default)
    choices = ", ".join(code(c) for c in action.choices) if action.choices else ""
    return [name, cell(help), shown, choices]


def config_table(cls: type) -> str:
    """One row per field of the config dataclass ``cls``, from its ``Spec`` and the source."""
    notes = source_comments(cls)
    rows = []
    for f in dataclasses.fields(cls):
        spec = f.metadata.get("spec")
        if spec is not None and spec.kind == "nested":
            accepts, shown = f"a mapping: [{spec.nested.__name__}](#{spec.nested.__name__.lower()})", "its defaults"
        else:
            accepts, shown = cell(spec.describe()) if spec else type_text(f.type), default_text(f, json_value)
        flag = ", ".join(code(x) for x in (spec.flag, *spec.aliases)) if spec and spec.flag else ""
        help = spec.help if spec else ""
        try:
            help = help % {"default": f.default, "prog": "autoprune"}
        except (KeyError, TypeError, ValueError):
            pass
        rows.append([code(f.name), accepts, shown, flag, cell(help), cell(notes.get(f.name, ""))])
    return table(["Field", "Accepts", "Default", "Flag", "Help", "Notes"], rows)


def policy_page() -> str:
    from autoprune import config

    intro = (
        "A policy file is a JSON object with the fields below (`autoprune prune --policy FILE`; each run "
        "writes `DIR/policy.json`). A field left out keeps its default; an unknown key is an error. "
        "*Notes* are the comments beside the field in the source."
    )
    others = "These are not part of a policy file: the command line's flags and the Python API's configs set them."
    parts = [intro]
    for cls in (config.Policy, config.FinetuneConfig):
        parts += [f"## {cls.__name__}", prose(cls.__doc__), config_table(cls)]
    parts += ["## Other settings", others]
    for name in ("Budget", "TaskConfig", "EngineConfig", "MeasureConfig", "SearchConfig", "AgentConfig"):
        parts += [f"### {name}", prose(getattr(config, name).__doc__), config_table(getattr(config, name))]
    return page("Policy file", "autoprune.config", *parts)


def options_table(options: dict, defaults: dict) -> str:
    """A registry entry's options (``Spec``s) with their defaults; their help where any has one."""
    helped = any(spec.help for spec in options.values())
    rows = [
        [code(k), cell(spec.describe()), json_value(defaults.get(k)), *([cell(spec.help)] if helped else [])]
        for k, spec in options.items()
    ]
    header = ["Option", "Accepts", "Default", *(["Help"] if helped else [])]
    return table(header, rows) if rows else "Options: none."


def _options(cls: type) -> list[str]:
    """A criterion's or method's options table, and the comment on its ``options`` in the source."""
    note = source_comments(cls).get("options") if cls.options else None
    return [options_table(cls.options, cls.defaults), f"Options (from the source): {cell(note)}" if note else ""]


def criteria_page() -> str:
    from autoprune.engine.criteria import CRITERIA

    rows, sections = [], []
    for name in CRITERIA.names():
        cls = CRITERIA.get(name)
        structures = ", ".join(code(s) for s in cls.structures)
        opts = ", ".join(code(k) for k in cls.options)
        rows.append([f"[`{name}`](#{name})", structures, YES[cls.needs_data], opts, cell(first_sentence(cls.__doc__))])
        reduce = "over the group's own filters and norm entries only" if cls.out_only else "over every coupled slice"
        facts = f"- Structures: {structures}\n- Needs data: {YES[cls.needs_data]}\n- Channel scores: per-weight "
        sections += [f"## {name}", prose(cls.__doc__), f"{facts}scores reduced {reduce}", *_options(cls)]
    intro = (
        "A criterion scores every weight; the lowest scores are pruned first. Choose one with `--criterion NAME` "
        "and set its options with `--criterion-option KEY=VALUE` (a policy's `criterion_options`)."
    )
    header = ["Criterion", "Structures", "Needs data", "Options", "Summary"]
    return page("Criteria", "autoprune.engine.criteria.CRITERIA", intro, table(header, rows), *sections)


def methods_page() -> str:
    from autoprune.engine.methods import METHODS

    rows, sections = [], []
    for name in METHODS.names():
        cls = METHODS.get(name)
        opts = ", ".join(code(k) for k in cls.options)
        structures = ", ".join(cls.structures)
        rows.append([f"[`{name}`](#{name})", cls.family, structures, cell(cls.summary), opts, YES[cls.in_steps]])
        steps = "prunes in several steps (a policy with `exact` ratios refuses it)" if cls.in_steps else "prunes once"
        searched = ", ".join(f"{code(k)} from {', '.join(map(str, v))}" for k, v in cls.space.items())
        facts = f"- Family: {cls.family}\n- Structures: {structures}\n- It {steps}."
        if searched:
            facts += f"\n- The `methods` search space tries {searched}."
        sections += [f"## {name}", cell(cls.summary), prose(cls.__doc__), facts, *_options(cls)]
    intro = (
        "A method decides when pruning happens and how the network recovers. Choose one with `--method NAME` and "
        "set its options with `--method-option KEY=VALUE` (a policy's `method_options`)."
    )
    header = ["Method", "Family", "Structures", "Summary", "Options", "In steps"]
    return page("Methods", "autoprune.engine.methods.METHODS", intro, table(header, rows), *sections)


def searchers_page() -> str:
    from autoprune.search.searchers import SEARCHERS, SearcherSpec

    meaning = source_comments(SearcherSpec)
    fields = [f for f in dataclasses.fields(SearcherSpec) if f.name not in ("make", "summary")]
    rows, sections = [], []
    for name in SEARCHERS.names():
        spec = SEARCHERS.get(name)
        rows.append([f"[`{name}`](#{name})", cell(spec.summary), YES[spec.multi_objective], code(spec.scheduler)])
        settings = [[code(f.name), code(getattr(spec, f.name)), cell(meaning.get(f.name, ""))] for f in fields]
        sections += [f"## {name}", cell(spec.summary), table(["Setting", "Value", "Meaning"], settings)]
    intro = "Choose a searcher with `autoprune search --searcher NAME`."
    header = ["Searcher", "Summary", "Multi-objective", "Default scheduler"]
    return page("Searchers", "autoprune.search.searchers.SEARCHERS", intro, table(header, rows), *sections)


def spaces_page() -> str:
    import autoprune.search_spaces as spaces

    sections = []
    for name in spaces.SPACES.names():
        space = spaces.SPACES.get(name)
        grid = "It has a `grid`, so `--searcher grid` can run every cell of it once. " if hasattr(space, "grid") else ""
        only = f"It samples structure {code(space.structure)} only." if getattr(space, "structure", None) else ""
        sections += [f"## {name}", prose(space.__doc__), grid + only]
    user = (
        "Besides these names, `--space package.module:function` names your own space: a function "
        "`space(trial, table) -> dict` of policy fields, as below."
    )
    rows = [[f"[`{n}`](#{n})", cell(first_sentence(spaces.SPACES.get(n).__doc__))] for n in spaces.SPACES.names()]
    parts = [user, table(["Space", "Samples"], rows), *sections, "## Your own space", prose(spaces.__doc__)]
    return page("Search spaces", "autoprune.search_spaces.SPACES", *parts)


def tasks_page() -> str:
    from autoprune.engine.tasks import TASKS, Task

    rows, sections = [], []
    for name in TASKS.names():
        spec = TASKS.get(name)
        models = "any torchvision classification model" if spec.models is None else ", ".join(map(code, spec.models))
        rows.append([f"[`{name}`](#{name})", models, code(spec.default_model), YES[spec.data_dir]])
        sections += [f"## {name}", prose(spec.build.__doc__)]
    notes = source_comments(Task)
    fields = [
        [code(f.name), type_text(f.type), default_text(f), cell(notes.get(f.name, ""))]
        for f in dataclasses.fields(Task)
    ]
    user = (
        "`--task package.module:function` names a function that returns an `autoprune.Task` "
        "(it may take the `TaskConfig` of the command line as its one argument)."
    )
    header, more = ["Task", "Models", "Default model", "Reads --data-dir"], ["Field", "Type", "Default", "Notes"]
    parts = [table(header, rows), *sections, "## Your own task", user, prose(Task.__doc__), table(more, fields)]
    return page("Tasks", "autoprune.engine.tasks.TASKS", *parts)


def summary_page() -> str:
    from autoprune.search import summary

    consts = source_comments(summary)
    notes = {"schema_version": f"`SCHEMA_VERSION`: {consts.get('SCHEMA_VERSION', '')}"}
    notes.update(source_comments(summary.SearchSummary))
    written = {True: "when present", False: "always"}
    rows = [
        [code(f.name), type_text(f.type), written[f.name in summary.OPTIONAL], cell(notes.get(f.name, ""))]
        for f in dataclasses.fields(summary.SearchSummary)
    ]
    intro = (
        f"`autoprune search` writes `summary.json` beside its best model: one JSON object with the keys below, "
        f"in this order. {cell(prose(summary.SearchSummary.__doc__))} Its `schema_version` is "
        f"{code(summary.SCHEMA_VERSION)}. A key written *when present* is left out when the search has no value "
        "for it; a key written *always* whose type allows `None` holds `null` when it has none."
    )
    return page(
        "summary.json",
        "autoprune.search.summary.SearchSummary",
        intro,
        table(["Key", "Type", "Written", "Meaning"], rows),
    )


def model_file_page() -> str:
    from autoprune.engine import checkpoint

    notes = source_comments(checkpoint.ModelRecord)
    rows = [
        [
            code(f.name),
            type_text(f.type),
            cell(f.metadata["spec"].describe()),
            default_text(f, json_value),
            cell(notes.get(f.name, "")),
        ]
        for f in dataclasses.fields(checkpoint.ModelRecord)
    ]
    intro = (
        "`model.pt`, written by `autoprune prune` and `autoprune search`, is a dictionary saved with "
        "`torch.save` and loaded with `torch.load(weights_only=True)`: tensors, numbers, strings and plain "
        "containers only, so loading a file never runs code it names. `autoprune.load_model` and "
        f"`autoprune evaluate` read it. Its `format` is {code(checkpoint.FORMAT)}. "
        f"{cell(prose(checkpoint.ModelRecord.__doc__))} The `task` is a [TaskConfig](policy.md#taskconfig) "
        "and the `policy` a [Policy](policy.md#policy), as mappings."
    )
    table_ = table(["Key", "Type", "Accepts", "Default", "Meaning"], rows)
    return page("model.pt", "autoprune.engine.checkpoint.ModelRecord", intro, table_)


WRITERS = (cli_page, policy_page, criteria_page, methods_page, searchers_page, spaces_page, tasks_page)
WRITERS += (summary_page, model_file_page)
# each page's path under docs/src: reference/cli.md, ..., reference/model-file.md
PAGES = {f"reference/{w.__name__.removesuffix('_page').replace('_', '-')}.md": w for w in WRITERS}


def pages() -> dict[str, str]:
    """Each generated page's path under ``docs/src`` and its markdown."""
    return {path: write() for path, write in PAGES.items()}
