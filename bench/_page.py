"""The results page every benchmark writes beside its printout: ``docs/src/results/<name>.md``.

Each script in bench/ names the machine it ran on with :func:`machine` (and nothing else), and
writes its page with :class:`Page`: a fixed header (title, UTC date, machine, wall time, the
exact command), what was run (generated from the script's own arguments), then its tables and
the sentences computed from its results, the same rows feeding the printout and the page.
``--no-page`` skips the page; ``--page-dir DIR`` writes it elsewhere.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import re
import shlex
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PAGE_DIR = ROOT / "docs" / "src" / "results"
WIDEST = 40  # cells longer than this are not padded to: a long message would widen its whole column


def plain(name: str) -> str:
    """A hardware name without trademark signs, clock speed or punctuation, so that it reads one
    way everywhere: ``"Intel(R) Xeon(R) CPU @ 2.20GHz"`` -> ``"Intel Xeon"``."""
    name = re.sub(r"\((R|TM|C)\)", " ", name, flags=re.I)
    name = re.sub(r"\s*(CPU\s*)?@.*$", "", name)
    name = re.sub(r"[^\w ()-]+", " ", name)
    return " ".join(name.split()) or "unknown"


@functools.cache
def machine() -> str:
    """The hardware and torch a result belongs to, named one way by every script:
    ``"AMD EPYC, 2 cores, no GPU; torch 2.14.1"``."""
    import torch

    from autoprune.engine.measure import device_name

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        gpu = plain(device_name("cuda:0"))
        gpu = f"{count} x {gpu}" if count > 1 else gpu
    else:
        gpu = "no GPU"
    cpu, version = plain(device_name("cpu")), torch.__version__.split("+")[0]
    return f"{cpu}, {cores} {'core' if cores == 1 else 'cores'}, {gpu}; torch {version}"


def command(script: str, argv: Sequence[str] | None = None) -> str:
    """The command that ran ``script``, rebuilt from ``sys.argv`` (with ``PYTHONPATH=bench``
    in front when bench/ was put on the path that way)."""
    argv = sys.argv[1:] if argv is None else argv
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = "PYTHONPATH=bench " if any(Path(p).resolve() == BENCH for p in paths) else ""
    return f"{env}python bench/{Path(script).name} {shlex.join(argv)}".rstrip()


def duration(seconds: float) -> str:
    """``"42 s"``, ``"4 min 12 s"``, ``"2 h 5 min"``."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(head: Sequence[object], rows: Iterable[Sequence[object]], align: str | None = None) -> str:
    """A markdown table, its columns padded so that it reads in a terminal too. ``align``: one
    letter per column, ``l`` or ``r`` (default: all left); short rows are filled with blanks."""
    cells = [[_cell(c) for c in head]]
    for row in rows:
        cells.append([_cell(c) for c in row] + [""] * (len(head) - len(row)))
    align = align or "l" * len(head)
    widths = [max(3, len(cells[0][i]), *(min(len(r[i]), WIDEST) for r in cells[1:])) for i in range(len(head))]

    def line(row: list[str]) -> str:
        padded = (c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(row, widths, align))
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 1) + (":" if a == "r" else "-") for w, a in zip(widths, align)) + "|"
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--no-page`` and ``--page-dir``, for every script."""
    group = parser.add_argument_group("results page")
    group.add_argument("--no-page", action="store_true", help="print only; write no results page")
    group.add_argument(
        "--page-dir", type=Path, default=PAGE_DIR, help=f"where the page goes (default {PAGE_DIR.relative_to(ROOT)})"
    )
    group.add_argument("--page-name", help="the page's file name without .md (default: the script's name, '-' for '_')")


class Page:
    """One run's results page: started with the run (its date and wall time count from here),
    filled as results come, written at the end by :meth:`write`."""

    def __init__(self, script: str, title: str, args: argparse.Namespace) -> None:
        self.script = Path(script).name
        self.slug = getattr(args, "page_name", None) or Path(script).stem.replace("_", "-")
        self.title = title
        self.folder: Path | None = None if getattr(args, "no_page", False) else Path(args.page_dir)
        self.date = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
        self.command = command(script)
        self.sections: list[str] = []
        self._t0 = time.perf_counter()

    def add(self, *blocks: str) -> None:
        """Markdown blocks (a table, a paragraph, a ``###`` heading) for the results, in order."""
        self.sections += [b.strip("\n") for b in blocks if b and b.strip()]

    def show(self, *blocks: str) -> None:
        """Print the blocks and add them to the page: one text for both."""
        for b in blocks:
            print(b, flush=True)
        self.add(*blocks)

    def text(self, protocol: str) -> str:
        header = (
            f"# {self.title}\n\n"
            f"Measured on {self.date} (UTC) on {machine()}, in {duration(time.perf_counter() - self._t0)}.\n\n"
            f"Command: `{self.command}`\n\n"
            f"## What was run\n\n{protocol.strip()}\n\n## Results\n\n"
        )
        footer = f"\n\n<!-- written by bench/{self.script}: run it again rather than editing this page -->\n"
        return header + "\n\n".join(self.sections) + footer

    def write(self, protocol: str) -> Path | None:
        """Write the page (unless ``--no-page``); its path."""
        if self.folder is None:
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{self.slug}.md"
        path.write_text(self.text(protocol))
        print(f"results page: {path}", flush=True)
        return path


def pm(values: Sequence[float], digits: int = 2, scale: float = 1.0) -> str:
    """``"mean ± std"`` of ``values`` times ``scale`` (std 0 for one value; ``-`` for none)."""
    import statistics

    if not values:
        return "-"
    vals = [scale * v for v in values]
    spread = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.fmean(vals):.{digits}f} ± {spread:.{digits}f}"


def listing(values: Iterable[object]) -> str:
    """``"a, b and c"``."""
    items = [str(v) for v in values]
    if len(items) < 2:
        return items[0] if items else "none"
    return ", ".join(items[:-1]) + " and " + items[-1]
