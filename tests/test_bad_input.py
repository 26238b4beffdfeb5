"""Bad and hostile input, as a new user (or an attacker) types it: every row exits 2 with one
line on stderr naming the bad value, no traceback, and nothing written: no output folder,
no cache entry, no MLflow run left RUNNING, no marker file from code a file tried to run.

Each row is ``(id, argv, words, setup)``: ``{d}`` in argv is the row's own folder, where
``setup(d, model)`` first writes what the row needs (``model`` is a good pruned model file);
``words`` must all appear in the one stderr line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from autoprune.engine.methods import METHODS

MARKER = "PWNED"  # what a hostile file tries to create in the row's folder


# ------------------------------------------------------------------ setups: files the rows need


def _json(name: str, data) -> callable:
    def setup(d: Path, model: Path) -> None:
        (d / name).write_text(data if isinstance(data, str) else json.dumps(data))

    return setup


def _file(name: str, content: bytes = b"") -> callable:
    def setup(d: Path, model: Path) -> None:
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(content)

    return setup


def _code_pickle(d: Path, model: Path) -> None:
    class Payload:  # unpickling it would create the marker
        def __reduce__(self):
            return (open, (str(d / MARKER), "w"))

    torch.save({"w": Payload()}, d / "code.pt")


def _other_arch(d: Path, model: Path) -> None:
    from autoprune.engine.models import resnet20

    torch.save(resnet20().state_dict(), d / "r20.pt")


def _nan_checkpoint(d: Path, model: Path) -> None:
    """Dense weights of the default task's model, one tensor NaN (a diverged training run)."""
    from autoprune.config import TaskConfig
    from autoprune.engine.tasks import get_task

    state = get_task(TaskConfig()).model_factory().state_dict()
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first] = torch.full_like(state[first], float("nan"))
    torch.save(state, d / "nan.pt")


def _edited_model(field: str, value) -> callable:
    """A copy of the good model whose record says ``field`` = ``value`` (``task.name``...)."""

    def setup(d: Path, model: Path) -> None:
        blob = torch.load(model, weights_only=True)
        section, _, key = field.partition(".")
        if key:
            blob[section][key] = value
        else:
            blob[section] = value
        torch.save(blob, d / "m.pt")

    return setup


def _evil_module(d: Path) -> None:
    """A module that creates the marker when imported."""
    (d / "evilmod.py").write_text(f"open({str(d / MARKER)!r}, 'w').close()\ndef build():\n    pass\n")


def _user_task_model(d: Path, model: Path) -> None:
    _evil_module(d)
    _edited_model("task.name", "evilmod:build")(d, model)


def _cifar_files(d: Path, hostile: str | None) -> Path:
    """A CIFAR-10 python-format folder; ``hostile`` names the file that carries a payload."""
    root = d / "cifar" / "cifar-10-batches-py"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)

    class Payload:
        def __reduce__(self):
            return (open, (str(d / MARKER), "w"))

    def batch(n: int) -> dict:
        return {b"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), b"labels": [i % 10 for i in range(n)]}

    files = {f"data_batch_{i}": batch(20) for i in range(1, 6)}
    files["test_batch"] = batch(20)
    files["batches.meta"] = {"label_names": [f"c{i}" for i in range(10)]}
    for name, content in files.items():
        if name == hostile:
            content = {**content, "x": Payload()} if isinstance(content, dict) else content
        with open(root / name, "wb") as f:
            pickle.dump(content, f)
    return d / "cifar"


def _hostile_cifar(name: str) -> callable:
    def setup(d: Path, model: Path) -> None:
        _cifar_files(d, name)

    return setup


def _cifar_model(d: Path, model: Path) -> None:
    """A model whose record points at a hostile CIFAR folder: loading it must not read it."""
    _edited_model(
        "task",
        {
            "name": "cifar10",
            "model": None,
            "data_dir": str(_cifar_files(d, "batches.meta")),
            "image_size": None,
            "batch_size": 64,
        },
    )(d, model)


def _image_folder(classes: int) -> callable:
    def setup(d: Path, model: Path) -> None:
        from PIL import Image

        for c in range(classes):
            (d / "img" / f"class_{c}").mkdir(parents=True)
            for i in range(8):
                Image.new("RGB", (16, 16), (40 * c, 10 * i, 0)).save(d / "img" / f"class_{c}" / f"{i}.png")

    return setup


def _garbage_sqlite(d: Path, model: Path) -> None:
    (d / "g.db").write_bytes(np.random.default_rng(0).bytes(4096))


def _other_sqlite(d: Path, model: Path) -> None:
    with sqlite3.connect(d / "o.db") as db:
        db.execute("CREATE TABLE notes (x TEXT)")


def _saved_search(d: Path, model: Path) -> None:
    """The state an interrupted search leaves behind (as autoprune.search writes it)."""
    from autoprune.config import SearchConfig

    saved = dataclasses.asdict(SearchConfig(name="old", trials=2))
    saved.update(
        out=str(d / "res" / "old" / "best"),
        scheduler="asha",
        concurrency=1,
        tracking_uri=f"sqlite:///{d / 'mlflow.db'}",
        storage=str(d / "res"),
    )
    (d / "res" / "old").mkdir(parents=True)
    (d / "res" / "old" / "autoprune-search.json").write_text(json.dumps({"config": saved}))


def _home_file(name: str, content: bytes):
    """A file in the row's home folder (``HOME``)."""

    def setup(d: Path, model: Path) -> None:
        path = d.parent / "home" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)

    return setup


def _long_history(d: Path, model: Path) -> None:
    """The good model file with its pruning history's first step repeated 200,000 times."""
    blob = torch.load(model, weights_only=True)
    blob["history"] = [blob["history"][0]] * 200_000
    torch.save(blob, d / "long.pt")


def _saved_with(**files: bytes):
    """An interrupted search's state (``_saved_search``) plus files under its folder, by
    relative path (``trials__t1_json`` -> ``trials/t1.json``)."""

    def setup(d: Path, model: Path) -> None:
        _saved_search(d, model)
        for name, data in files.items():
            path = d / "res" / "old" / name.replace("__", "/").replace("_json", ".json")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)

    return setup


def _saved_naming_code(d: Path, model: Path) -> None:
    _saved_search(d, model)
    state = d / "res" / "old" / "autoprune-search.json"
    saved = json.loads(state.read_text())
    saved["config"]["space"] = "evil:space"
    state.write_text(json.dumps(saved))
    (d / "evil.py").write_text(f"import os\nos.mkdir({str(d / 'imported')!r})\n")


# ------------------------------------------------------------------ the table

PRUNE = ["prune", "--out", "{d}/o"]
SEARCH = ["search", "--storage", "{d}/res"]
IMAGES = ["--task", "imagefolder", "--data-dir", "{d}/img"]

ROWS = [
    # budgets
    ("budget-above-1", [*PRUNE, "--budget-flops", "1.5"], ["1.5", "(0, 1]"], None),
    ("budget-0", [*PRUNE, "--budget-flops", "0"], ["--budget-flops", "(0, 1]"], None),
    ("budget-negative", [*PRUNE, "--budget-params", "-1"], ["-1", "(0, 1]"], None),
    ("budget-not-a-number", [*PRUNE, "--budget-flops", "half"], ["--budget-flops", "'half'"], None),
    ("budget-unreachable-channel", [*PRUNE, "--budget-flops", "0.01"], ["unreachable", "smallest reachable"], None),
    (
        "budget-unreachable-masks",
        [*PRUNE, "--structure", "unstructured", "--budget-flops", "0.05"],
        ["unreachable", "unstructured"],
        None,
    ),
    (
        "budget-latency-masks",
        [*PRUNE, "--structure", "unstructured", "--budget-latency", "0.6"],
        ["--budget-latency needs --structure channel", "'unstructured'", "--budget-flops"],
        None,
    ),
    ("budget-latency-above-1", [*PRUNE, "--budget-latency", "2"], ["--budget-latency", "(0, 1]"], None),
    ("latency-batch-0", [*PRUNE, "--budget-latency", "0.5", "--latency-batch", "0"], ["--latency-batch", ">= 1"], None),
    (
        "latency-batch-huge",
        [*PRUNE, "--budget-latency", "0.5", "--latency-batch", "100000"],
        ["--latency-batch", "at most 65536"],
        None,
    ),
    *(
        (
            f"latency-batch-past-memory-{cmd[0]}",
            [*cmd, *IMAGES, "--model", "resnet18", "--budget-latency", "0.5", "--latency-batch", "65536"],
            ["--latency-batch 65536 needs about", "GiB free", "use --latency-batch"],
            _image_folder(2),
        )
        for cmd in (PRUNE, SEARCH)
    ),
    ("budget-two-kinds", [*PRUNE, "--budget-flops", "0.5", "--budget-latency", "0.5"], ["not allowed with"], None),
    # names
    ("criterion", [*PRUNE, "--criterion", "psychic"], ["psychic", "magnitude", "random"], None),
    ("task", [*PRUNE, "--task", "mnist"], ["mnist", "digits", "cifar10", "imagefolder"], None),
    ("model", [*PRUNE, "--model", "vgg16"], ["vgg16", "digits_resnet"], None),
    ("method", [*PRUNE, "--method", "lotto"], ["lotto", *METHODS.names()], None),
    ("structure-choice", [*PRUNE, "--structure", "blocks"], ["--structure", "'blocks'", "channel"], None),
    (
        "criterion-structure",
        [*PRUNE, "--criterion", "fpgm", "--structure", "unstructured"],
        ["fpgm", "channel", "unstructured"],
        None,
    ),
    ("user-task-missing", [*PRUNE, "--task", "nosuchpkg.mod:fn"], ["nosuchpkg.mod"], None),
    ("user-task-raises", [*PRUNE, "--task", "builtins:eval"], ["task 'builtins:eval' failed", "TypeError"], None),
    ("user-task-raises-list", ["list", "groups", "--task", "builtins:eval"], ["task 'builtins:eval' failed"], None),
    (
        "user-task-raises-search",
        [*SEARCH, "--trials", "2", "--task", "builtins:eval"],
        ["task 'builtins:eval' failed", "TypeError"],
        None,
    ),
    (
        "imagefolder-model",
        [*PRUNE, "--task", "imagefolder", "--model", "nonet", "--data-dir", "{d}"],
        ["nonet", "resnet18"],
        None,
    ),
    # criterion options and policy fields
    (
        "option-unknown",
        [*PRUNE, "--criterion", "hutchinson", "--criterion-option", "probe=3"],
        ["probe", "probes", "temperature"],
        None,
    ),
    (
        "option-range",
        [*PRUNE, "--criterion", "hutchinson", "--criterion-option", "probes=0"],
        ["probes", ">= 1, at most 10000", "got 0"],
        None,
    ),
    ("option-form", [*PRUNE, "--criterion-option", "p"], ["KEY=VALUE"], None),
    ("option-value", [*PRUNE, "--criterion-option", "p=3"], ["option p", "an integer in [1, 2]", "got 3"], None),
    # values past what is declared: int64, infinities, fractions for integers, rounds without end
    ("seed-past-int64", [*PRUNE, "--seed", str(2**64)], ["--seed", "at most 4294967295"], None),
    ("lr-huge", [*PRUNE, "--lr", "1e300"], ["--lr", "at most 1000000", "1e+300"], None),
    ("iterations-past-int64", [*PRUNE, "--method", "iterative", "--iterations", str(10**23)], ["--iterations"], None),
    ("threads-huge", [*PRUNE, "--threads", "100000"], ["--threads", "at most 1024"], None),
    (
        "option-infinite",
        [*PRUNE, "--criterion", "hutchinson", "--criterion-option", "temperature=Infinity"],
        ["temperature", "'Infinity'"],
        None,
    ),
    (
        "option-fraction",
        [*PRUNE, "--criterion", "hutchinson", "--criterion-option", "probes=2.5"],
        ["probes", "an integer", "2.5"],
        None,
    ),
    ("option-rounds", [*PRUNE, "--criterion", "synflow", "--criterion-option", "rounds=1e9"], ["rounds"], None),
    ("iterations", [*PRUNE, "--method", "iterative", "--iterations", "0"], ["--iterations", ">= 1", "0"], None),
    (
        "method-option-unknown",
        [*PRUNE, "--method", "iterative", "--method-option", "warmup=3"],
        ["method 'iterative' has no option 'warmup'", "iterations"],
        None,
    ),
    (
        "iterations-for-oneshot",
        [*PRUNE, "--iterations", "3"],
        ["method 'oneshot' has no option 'iterations'", "none"],
        None,
    ),
    (
        "method-option-value",
        [*PRUNE, "--method", "gradual", "--method-option", "iterations=many"],
        ["iterations", "'many'", "an integer >= 1"],
        None,
    ),
    ("keep-glob", [*PRUNE, "--keep", "head*"], ["--keep 'head*'", "stem.0"], None),
    ("keep-types", [*PRUNE, "--keep-types", "lin"], ["--keep-types", "'lin'", "linear"], None),
    (
        "keep-everything",
        [*PRUNE, "--structure", "unstructured", "--keep-types", "conv,linear"],
        ["nothing is left to prune"],
        None,
    ),
    ("warmup-mode", [*PRUNE, "--bn-warmup-mode", "study"], ["--bn-warmup-mode", "'study'"], None),
    ("per-layer-without-ratios", [*PRUNE, "--scope", "per_layer"], ["ratios"], None),
    ("max-ratio", [*PRUNE, "--max-ratio", "1.5"], ["--max-ratio", "(0, 1]", "1.5"], None),
    ("lr", [*PRUNE, "--lr", "0"], ["--lr", "> 0", "0"], None),
    ("finetune-epochs", [*PRUNE, "--finetune-epochs", "-1"], ["--finetune-epochs", ">= 0", "-1"], None),
    (
        "policy-bool-as-text",
        [*PRUNE, "--policy", "{d}/p.json"],
        ["bn_warmup", "'yes'", "true or false"],
        _json("p.json", {"bn_warmup": "yes"}),
    ),
    (
        "policy-bool-as-false-text",
        [*PRUNE, "--policy", "{d}/p.json"],
        ["bn_warmup", "'false'"],
        _json("p.json", {"bn_warmup": "false"}),
    ),
    (
        "policy-ratio-type",
        [*PRUNE, "--policy", "{d}/p.json"],
        ["ratios", "'half'"],
        _json("p.json", {"scope": "per_layer", "ratios": {"layers.0.conv1": "half"}}),
    ),
    ("policy-not-json", [*PRUNE, "--policy", "{d}/p.json"], ["not valid JSON", "p.json"], _json("p.json", "{no")),
    ("policy-deep", [*PRUNE, "--policy", "{d}/p.json"], ["p.json", "nested"], _json("p.json", "[" * 10_000)),
    (
        "policy-digits",
        [*PRUNE, "--policy", "{d}/p.json"],
        ["p.json", "not valid JSON", "digits"],
        _json("p.json", '{"max_ratio": ' + "9" * 5_000 + "}"),
    ),
    (
        "policy-not-utf8",
        [*PRUNE, "--policy", "{d}/p.json"],
        ["p.json", "not UTF-8"],
        _file("p.json", b'{"criterion": "\xff\xfe"}'),
    ),
    (
        "policy-infinity",
        [*PRUNE, "--policy", "{d}/p.json"],
        ["p.json", "Infinity is not JSON"],
        _json("p.json", '{"max_ratio": Infinity}'),
    ),
    (
        "policy-huge",
        [*PRUNE, "--policy", "{d}/p.json"],
        ["p.json", "at most 1048576"],
        _file("p.json", b" " * (1 << 21)),
    ),
    ("criterion-huge", [*PRUNE, "--criterion", "x" * 5_000], ["--criterion", "at most 4096 characters"], None),
    (
        "policy-unknown-key",
        [*PRUNE, "--policy", "{d}/p.json"],
        ["sparsity", "criterion"],
        _json("p.json", {"sparsity": 0.5}),
    ),
    (
        "policy-unknown-group",
        [*PRUNE, "--policy", "{d}/p.json"],
        ["layers.9.conv1", "stem.0"],
        _json("p.json", {"scope": "per_layer", "ratios": {"layers.9.conv1": 0.5}}),
    ),
    # numbers
    ("batch-size", [*PRUNE, "--batch-size", "0"], ["--batch-size", ">= 1", "0"], None),
    ("threads", [*PRUNE, "--threads", "0"], ["--threads", ">= 1", "0"], None),
    ("image-size-negative", [*PRUNE, "--image-size", "-4"], ["--image-size", "-4"], None),
    ("image-size-0", [*PRUNE, "--image-size", "0"], ["--image-size", "0"], None),
    ("train-epochs", [*PRUNE, "--train-epochs", "-5"], ["--train-epochs", ">= 0", "-5"], None),
    ("scoring-per-class", [*PRUNE, "--scoring-per-class", "0"], ["--scoring-per-class", ">= 1"], None),
    ("seed", [*PRUNE, "--seed", "-1"], ["--seed", ">= 0"], None),
    # data
    ("data-dir-missing", [*PRUNE, "--task", "imagefolder", "--model", "resnet18"], ["--data-dir"], None),
    (
        "data-dir-absent",
        [*PRUNE, "--task", "cifar10", "--data-dir", "/no/such/dir"],
        ["/no/such/dir", "does not exist"],
        None,
    ),
    (
        "one-class-folder",
        [*PRUNE, "--task", "imagefolder", "--data-dir", "{d}/img", "--image-size", "16"],
        ["class"],
        _image_folder(1),
    ),
    (
        "cifar-meta-runs-code",
        [*PRUNE, "--task", "cifar10", "--data-dir", "{d}/cifar"],
        ["batches.meta", "open"],
        _hostile_cifar("batches.meta"),
    ),
    (
        "cifar-batch-runs-code",
        [*PRUNE, "--task", "cifar10", "--data-dir", "{d}/cifar"],
        ["data_batch_1", "open"],
        _hostile_cifar("data_batch_1"),
    ),
    # checkpoints
    ("checkpoint-absent", [*PRUNE, "--checkpoint", "/no/such.pt"], ["/no/such.pt", "does not exist"], None),
    ("checkpoint-directory", [*PRUNE, "--checkpoint", "{d}"], ["--checkpoint", "is a directory"], None),
    ("checkpoint-empty", [*PRUNE, "--checkpoint", "{d}/e.pt"], ["e.pt", "empty"], _file("e.pt")),
    (
        "checkpoint-garbage",
        [*PRUNE, "--checkpoint", "{d}/g.pt"],
        ["g.pt", "not a readable torch file"],
        _file("g.pt", b"not a torch file at all"),
    ),
    (
        "checkpoint-runs-code",
        [*PRUNE, "--checkpoint", "{d}/code.pt"],
        ["code.pt", "asks to load", "open"],
        _code_pickle,
    ),
    ("checkpoint-other-model", [*PRUNE, "--checkpoint", "{d}/r20.pt"], ["missing", "unexpected", "shape"], _other_arch),
    (
        "checkpoint-nan",
        [*PRUNE, "--checkpoint", "{d}/nan.pt"],
        ["--checkpoint", "nan.pt", "holds NaN or infinite values"],
        _nan_checkpoint,
    ),
    # output locations
    ("out-unwritable", ["prune", "--out", "/proc/nonexist/out"], ["/proc/nonexist/out", "not writable"], None),
    ("out-is-a-file", ["prune", "--out", "{d}/f"], ["{d}/f", "not a directory"], _file("f", b"x")),
    (
        "out-holds-results",
        ["prune", "--out", "{d}/prev"],
        ["--out", "{d}/prev", "already holds summary.json", "--overwrite"],
        _file("prev/summary.json", b"{}"),
    ),
    ("out-empty", ["prune", "--out", ""], ["--out is empty"], None),
    (
        "out-dangling-link",
        ["prune", "--out", "{d}/link"],
        ["{d}/link", "is a link to", "does not exist"],
        lambda d, m: (d / "link").symlink_to(d / "nowhere"),
    ),
    (
        "export-over-earlier-file",
        ["export", "{d}/m.pt", "--out", "{d}/summary.json"],
        ["{d}/summary.json", "exists", "--overwrite"],
        lambda d, m: (shutil.copy(m, d / "m.pt"), (d / "summary.json").write_text("{}")),
    ),
    ("cache-dir-is-a-file", [*PRUNE, "--cache-dir", "{d}/f"], ["--cache-dir", "not a directory"], _file("f", b"x")),
    # saved models
    ("model-absent", ["evaluate", "{d}/none.pt"], ["none.pt", "does not exist"], None),
    ("model-is-a-device", ["evaluate", "/dev/zero"], ["/dev/zero", "not a regular file"], None),
    (
        "model-other-task-no-data",
        ["evaluate", "{d}/m.pt", "--task", "cifar10"],
        ["task 'cifar10' needs --data-dir"],
        lambda d, m: shutil.copy(m, d / "m.pt"),
    ),
    (
        "model-is-a-pipe",
        ["evaluate", "{d}/fifo"],
        ["fifo", "not a regular file"],
        lambda d, m: os.mkfifo(d / "fifo"),
    ),
    (
        "model-not-pruned",
        ["evaluate", "{d}/w.pt"],
        ["not an autoprune pruned model"],
        lambda d, m: torch.save({"w": torch.zeros(2)}, d / "w.pt"),
    ),
    ("model-runs-code", ["evaluate", "{d}/code.pt"], ["asks to load"], _code_pickle),
    ("model-names-user-task", ["evaluate", "{d}/m.pt"], ["evilmod:build", "--task", "never"], _user_task_model),
    ("model-names-cifar-dir", ["evaluate", "{d}/m.pt"], ["cifar10", "--data-dir", "never"], _cifar_model),
    (
        "model-bad-record",
        ["evaluate", "{d}/m.pt"],
        ["bad record", "bn_warmup", "'yes'"],
        _edited_model("policy.bn_warmup", "yes"),
    ),
    ("model-bad-history", ["evaluate", "{d}/m.pt"], ["bad record", "history"], _edited_model("history", "rm -rf")),
    (
        "model-other-architecture",
        [
            "evaluate",
            "{d}/m.pt",
            "--task",
            "imagefolder",
            "--data-dir",
            "{d}/img",
            "--model",
            "resnet18",
            "--image-size",
            "16",
        ],
        ["pruned from model", "digits", "resnet18"],
        lambda d, m: (shutil.copy(m, d / "m.pt"), _image_folder(3)(d, m)),
    ),
    (
        "evaluate-threads",
        ["evaluate", "{d}/m.pt", "--threads", "-1"],
        ["--threads", "-1"],
        lambda d, m: shutil.copy(m, d / "m.pt"),
    ),
    (
        "export-onto-directory",
        ["export", "{d}/m.pt", "--out", "{d}"],
        ["--out", "is a directory"],
        lambda d, m: shutil.copy(m, d / "m.pt"),
    ),
    (
        "export-under-a-file",
        ["export", "{d}/m.pt", "--out", "{d}/m.pt/x.pt2"],
        ["is a file"],
        lambda d, m: shutil.copy(m, d / "m.pt"),
    ),
    (
        "export-unwritable",
        ["export", "{d}/m.pt", "--out", "/proc/nonexist/x.pt2"],
        ["not writable"],
        lambda d, m: shutil.copy(m, d / "m.pt"),
    ),
    # search
    ("search-budget", [*SEARCH, "--budget-flops", "1.5"], ["--budget-flops", "(0, 1]"], None),
    ("search-searcher", [*SEARCH, "--searcher", "annealing"], ["'annealing'", "tpe, nsga2, random, grid"], None),
    ("search-space", [*SEARCH, "--space", "nope"], ["'nope'", "default, criteria, pai"], None),
    ("search-space-module", [*SEARCH, "--space", "no_such_module:fn"], ["cannot import module 'no_such_module'"], None),
    ("search-trials", [*SEARCH, "--trials", "0"], ["--trials", ">= 1", "0"], None),
    ("search-cpus", [*SEARCH, "--cpus-per-trial", "4096"], ["--cpus-per-trial 4096 is more than this machine"], None),
    ("search-max-failures", [*SEARCH, "--max-failures", "-1"], ["--max-failures", "integer >= 0", "-1"], None),
    ("search-node-wait", [*SEARCH, "--node-wait", "-5"], ["--node-wait", "number >= 0"], None),
    ("search-gpus-fraction", [*SEARCH, "--gpus-per-trial", "0.25"], ["--gpus-per-trial 0.25 is more than"], None),
    (
        "search-storage-scheme",
        ["search", "--storage", "bogus://x/y", "--trials", "2"],
        ["--storage 'bogus://x/y'", "s3://bucket/path"],
        None,
    ),
    ("search-address", [*SEARCH, "--address", "127.0.0.1:1"], ["no Ray cluster answers at --address"], None),
    (
        "evaluate-device-meta",
        ["evaluate", "{d}/m.pt", "--device", "meta"],
        ["'meta' is not supported", "cuda:N"],
        lambda d, m: shutil.copy(m, d / "m.pt"),
    ),
    ("prune-device-xla", [*PRUNE, "--device", "xla"], ["'xla' is not supported"], None),
    (
        "export-pt2-name",
        ["export", "{d}/m.pt", "--out", "{d}/m.bin"],
        ["--out", "m.bin", "must end in .pt2"],
        lambda d, m: shutil.copy(m, d / "m.pt"),
    ),
    (
        "model-history-too-long",
        ["evaluate", "{d}/long.pt"],
        ["pruning history of 200000 steps", "altered"],
        _long_history,
    ),
    (
        "search-ray-token-garbage",
        [*SEARCH, "--trials", "2"],
        ["Ray token", ".ray/auth_token", "not a token"],
        _home_file(".ray/auth_token", b"\x00\xffnot a token\n"),
    ),
    ("search-nsga2-asha", [*SEARCH, "--searcher", "nsga2", "--scheduler", "asha"], ["use --scheduler none"], None),
    ("search-grid-space", [*SEARCH, "--searcher", "grid"], ["needs a space with a grid"], None),
    (
        "search-latency-masks",
        [*SEARCH, "--budget-latency", "0.5", "--structure", "any"],
        ["--budget-latency needs channel pruning", "--structure any"],
        None,
    ),
    ("search-latency-pai", [*SEARCH, "--budget-latency", "0.5", "--space", "pai"], ["space 'pai'"], None),
    ("search-metric", [*SEARCH, "--metric", "f1"], ["--metric", "'f1'", "'val_acc', 'val_loss'"], None),
    (
        "search-structure-choice",
        [*SEARCH, "--structure", "blocks"],
        ["'blocks'", "'channel', 'unstructured', 'any'"],
        None,
    ),
    ("search-name", [*SEARCH, "--name", "../up"], ["--name", "'../up'"], None),
    ("search-epochs-asha", [*SEARCH, "--epochs", "0", "--scheduler", "asha"], ["--epochs 0", "--scheduler none"], None),
    ("agent-flags-need-amc", [*SEARCH, "--reward", "acc_flops"], ["--reward", "with --searcher amc, not 'tpe'"], None),
    ("amc-reward", [*SEARCH, "--searcher", "amc", "--reward", "top5"], ["--reward", "'top5'", "acc_latency"], None),
    ("amc-masks", [*SEARCH, "--searcher", "amc", "--structure", "unstructured"], ["needs --structure channel"], None),
    ("amc-space", [*SEARCH, "--searcher", "amc", "--space", "criteria"], ["--space is for the Optuna"], None),
    ("amc-criterion", [*SEARCH, "--searcher", "amc", "--agent-criterion", "l7"], ["'l7'", "magnitude"], None),
    ("amc-option-name", [*SEARCH, "--searcher", "amc", "--agent-option", "sigmaa=1"], ["sigmaa", "sigma_decay"], None),
    (
        "amc-option-value",
        [*SEARCH, "--searcher", "amc", "--agent-option", "tau=fast"],
        ["tau='fast'", "a number"],
        None,
    ),
    (
        "amc-option-form",
        [*SEARCH, "--searcher", "amc", "--agent-option", "tau"],
        ["--agent-option 'tau'", "KEY=VALUE"],
        None,
    ),
    ("amc-reward-target", [*SEARCH, "--searcher", "amc", "--reward-target", "0"], ["--reward-target", "(0, 1]"], None),
    ("amc-metric", [*SEARCH, "--searcher", "amc", "--metric", "val_loss"], ["by its reward", "--metric"], None),
    (
        "amc-option-warmup",
        [*SEARCH, "--searcher", "amc", "--agent-option", "warmup_episodes=3"],
        ["--warmup-episodes"],
        None,
    ),
    ("amc-option-range", [*SEARCH, "--searcher", "amc", "--agent-option", "tau=2"], ["--agent-option", "tau"], None),
    ("amc-option-nan", [*SEARCH, "--searcher", "amc", "--agent-option", "actor_lr=NaN"], ["actor_lr", "'NaN'"], None),
    ("amc-warmup", [*SEARCH, "--searcher", "amc", "--warmup-episodes", "-1"], ["--warmup-episodes", ">= 0"], None),
    ("search-resume-absent", [*SEARCH, "--name", "absent", "--resume"], ["no search named 'absent'"], None),
    ("search-resume-unnamed", [*SEARCH, "--resume"], ["--resume needs --name"], None),
    (
        "search-resume-changed",
        [*SEARCH, "--name", "old", "--resume", "--budget-flops", "0.3", "--trials", "3"],
        ["0.3 (saved: 0.5)", "--trials 3 (saved: 2)"],
        _saved_search,
    ),
    (
        "search-resume-torn-record",
        [*SEARCH, "--name", "old", "--resume"],
        ["trial record", "trials/t1.json", "damaged or was altered", "move it away"],
        _saved_with(trials__t1_json=b'{"kind": "autoprune.trial", "vers'),
    ),
    (
        "search-resume-altered-record",
        [*SEARCH, "--name", "old", "--resume"],
        ["trials/t1.json", "not an autoprune trial record"],
        _saved_with(trials__t1_json=b'{"kind": "x"}'),
    ),
    (
        "search-resume-binary-record",
        [*SEARCH, "--name", "old", "--resume"],
        ["trials/t1.json", "not UTF-8 text"],
        _saved_with(trials__t1_json=b"\xff\xfe\x00garbage"),
    ),
    (
        "search-resume-torn-state",
        [*SEARCH, "--name", "old", "--resume"],
        ["autoprune-search.json", "not a readable search state"],
        _saved_with(**{"autoprune-search_json": b'{"config": {"name'}),
    ),
    (
        "search-resume-names-code",
        [*SEARCH, "--name", "old", "--resume"],
        ["saved with --space 'evil:space', code from a module", "add --space evil:space"],
        _saved_naming_code,
    ),
    (
        "search-resume-earlier-version",
        [*SEARCH, "--name", "old", "--resume"],
        ["made by an earlier autoprune", "start a new search"],
        _saved_with(**{"completed-trials__t1_json": b"{}"}),
    ),
    (
        "search-storage-is-a-file",
        ["search", "--storage", "{d}/f", "--trials", "2"],
        ["--storage", "not a directory"],
        _file("f", b"x"),
    ),
    ("search-out-unwritable", [*SEARCH, "--out", "/proc/nonexist/best"], ["--out", "not writable"], None),
    ("tracking-scheme", [*SEARCH, "--tracking-uri", "bogus://x/y"], ["'bogus://x/y'", "sqlite:///"], None),
    (
        "tracking-database-driver",
        [*SEARCH, "--tracking-uri", "postgresql://me:secret@127.0.0.1/mlflow"],
        ["'postgresql://me:***@127.0.0.1/mlflow'", "postgresql driver", "pip install"],
        None,
    ),
    (
        "search-out-holds-results",
        [*SEARCH, "--out", "{d}/prev"],
        ["--out", "already holds model.pt", "choose a new or empty folder"],
        _file("prev/model.pt", b"x"),
    ),
    ("search-storage-file-uri-relative", [*SEARCH, "--storage", "file://res"], ["file:///", "absolute"], None),
    ("tracking-file-store", [*SEARCH, "--tracking-uri", "file:///proc/nonexist/mlruns"], ["file store"], None),
    ("tracking-down-server", [*SEARCH, "--tracking-uri", "http://127.0.0.1:1"], ["does not answer"], None),
    (
        "tracking-garbage-sqlite",
        [*SEARCH, "--tracking-uri", "sqlite:///{d}/g.db"],
        ["not an SQLite database"],
        _garbage_sqlite,
    ),
    (
        "tracking-foreign-sqlite",
        [*SEARCH, "--tracking-uri", "sqlite:///{d}/o.db"],
        ["not an MLflow store"],
        _other_sqlite,
    ),
    ("ui-garbage-sqlite", ["ui", "--tracking-uri", "sqlite:///{d}/g.db"], ["not an SQLite database"], _garbage_sqlite),
    ("ui-scheme", ["ui", "--tracking-uri", "bogus://x"], ["'bogus://x'"], None),
    (
        "ui-port",
        ["ui", "--port", "70000", "--tracking-uri", "sqlite:///{d}/mlflow.db"],
        ["--port", "70000"],
        lambda d, m: _empty_store(d),
    ),
    (
        "ui-host",
        ["ui", "--host", "not a host", "--tracking-uri", "sqlite:///{d}/mlflow.db"],
        ["--host 'not a host'", "not an address"],
        lambda d, m: _empty_store(d),
    ),
]


def _empty_store(d: Path) -> None:
    with sqlite3.connect(d / "mlflow.db") as db:
        db.execute("CREATE TABLE experiments (x TEXT)")


@pytest.fixture(scope="module")
def good_model(tmp_path_factory, digits_task, digits_dense, digits_dense_metrics, engine_cfg) -> Path:
    """A real pruned model file, as `autoprune prune` writes it."""
    from autoprune import engine
    from autoprune.config import Budget, FinetuneConfig, Policy
    from autoprune.engine.checkpoint import architecture_key, save_model

    policy = Policy(finetune=FinetuneConfig(epochs=0))
    result = engine.run(digits_task, digits_dense, policy, Budget(), engine_cfg, digits_dense_metrics)
    path = tmp_path_factory.mktemp("good") / "model.pt"
    save_model(
        path,
        result.model,
        engine_cfg.task,
        "channel",
        result.history,
        policy.to_dict(),
        {},
        architecture_key(digits_dense),
    )
    return path


def _snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _running_runs(db: Path) -> int:
    if not db.is_file() or db.stat().st_size == 0:
        return 0
    with sqlite3.connect(db) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        return (
            conn.execute("SELECT COUNT(*) FROM runs WHERE status = 'RUNNING'").fetchone()[0] if "runs" in tables else 0
        )


# Rows that run as a real subprocess, where isolation matters: a hostile file that would run
# code, a name that makes autoprune import a module, MLflow run state, a Ray connection. Every
# other row runs here, through ``cli.main(argv)``, with the same checks.
ISOLATED = {
    name
    for name, argv, _, _ in ROWS
    if "runs-code" in name
    or name.startswith(("model-names-", "user-task", "search-space-module", "search-address", "search-resume"))
    or argv[0] == "ui"
    or "--tracking-uri" in argv
}


def _prepare(row: tuple, root: Path, model: Path) -> tuple[Path, dict, list[str], set[str]]:
    """The row's own folder with what its setup writes; its environment, argv and first snapshot."""
    name, argv, _, setup = row
    d = root / name / "d"
    home, cache = root / name / "home", root / name / "cache"
    for folder in (d, home, cache):
        folder.mkdir(parents=True)
    if setup is not None:
        setup(d, model)
    env = {"AUTOPRUNE_CACHE": str(cache), "HOME": str(home)}
    return d, env, [a.replace("{d}", str(d)) for a in argv], _snapshot(root / name)


def _outcome(proc, root: Path, name: str, d: Path, before: set[str]) -> dict:
    return {"proc": proc, "d": d, "written": _snapshot(root / name) - before, "running": _running_runs(d / "mlflow.db")}


def _run_isolated(row: tuple, root: Path, model: Path, cli) -> dict:
    d, env, argv, before = _prepare(row, root, model)
    env["PYTHONPATH"] = f"{d}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    proc = cli(*argv, cwd=d, env=env, timeout=180)
    return _outcome(proc, root, row[0], d, before)


def _run_here(row: tuple, root: Path, model: Path, cli_here, monkeypatch) -> dict:
    d, env, argv, before = _prepare(row, root, model)
    monkeypatch.syspath_prepend(str(d))
    return _outcome(cli_here(*argv, cwd=d, env=env), root, row[0], d, before)


@pytest.fixture(scope="module")
def isolated(tmp_path_factory, good_model, cli) -> dict[str, dict]:
    """The isolated rows, as real subprocesses; as many at once as this machine has cores (each
    is mostly Python and torch starting up)."""
    from concurrent.futures import ThreadPoolExecutor

    root = tmp_path_factory.mktemp("bad")
    rows = [row for row in ROWS if row[0] in ISOLATED]
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        futures = {row[0]: pool.submit(_run_isolated, row, root, good_model, cli) for row in rows}
        return {name: f.result() for name, f in futures.items()}


def test_the_table_is_large_enough():
    assert len(ROWS) >= 40 and len({r[0] for r in ROWS}) == len(ROWS)
    assert 10 <= len(ISOLATED) < len(ROWS) / 2


@pytest.mark.parametrize("name, words", [(r[0], r[2]) for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(
    name, words, request, tmp_path, good_model, cli_here, monkeypatch
):
    if name in ISOLATED:
        got = request.getfixturevalue("isolated")[name]
    else:
        row = next(r for r in ROWS if r[0] == name)
        got = _run_here(row, tmp_path, good_model, cli_here, monkeypatch)
    proc, d = got["proc"], got["d"]
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("autoprune: error: ") and "Traceback" not in proc.stderr
    assert "weights_only=False" not in proc.stderr  # torch's advice is never passed on
    for word in words:
        assert word.replace("{d}", str(d)) in lines[0], lines[0]
    assert not (d / MARKER).exists(), "a file ran code"
    assert not got["written"], f"written: {sorted(got['written'])}"
    assert got["running"] == 0


@pytest.mark.parametrize("kind", ["missing", "a file"])
def test_an_unwritable_temp_folder_is_one_line_before_any_work(kind, tmp_path, good_model, cli_here):
    """Ray and MLflow write under TMPDIR and would fail mid-way: a TMPDIR that cannot be
    written is refused first, naming it."""
    folder = tmp_path / "tmp"
    if kind == "a file":
        folder.write_bytes(b"")
    got = cli_here("evaluate", str(good_model), env={"TMPDIR": str(folder)})
    assert got.returncode == 2 and len(got.stderr.strip().splitlines()) == 1, got.stderr
    assert f"TMPDIR {str(folder)!r} cannot be written" in got.stderr


@pytest.mark.parametrize("reply", [b"HTTP/1.1 400 Bad Request\r\n\r\n", None])
def test_an_address_where_something_else_listens_is_refused_in_seconds(reply, tmp_path, cli_here):
    """Something that is not a Ray head (a web server; a service that says nothing) at
    --address: one line within 15 s, where Ray itself would retry for minutes."""
    import socket
    import threading

    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.recv(100)
            if reply:
                conn.sendall(reply)
            time.sleep(5 if reply is None else 0)
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    t0 = time.time()
    try:
        got = cli_here("search", "--storage", str(tmp_path / "res"), "--address", f"127.0.0.1:{port}")
    finally:
        server.close()
    assert got.returncode == 2 and time.time() - t0 < 15, got.stderr
    assert f"--address '127.0.0.1:{port}' answers, but not as a Ray head" in got.stderr
    assert len(got.stderr.strip().splitlines()) == 1 and not (tmp_path / "res").exists()


def test_a_full_disk_while_saving_is_one_line_and_leaves_no_half_result(tmp_path, digits_dense, engine_cfg):
    """The pruned model cannot be written (a file size limit stands in for a full disk: the
    write fails after its first bytes, as it does when the disk fills): one line naming the
    file, and no output folder left behind."""
    import resource
    import subprocess
    import sys

    def limit() -> None:  # model.pt is about 350 KB; the dense model is read from the cache
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))

    exe = Path(sys.executable).with_name("autoprune")
    out = tmp_path / "o"
    args = [str(exe), "prune", "--out", str(out), "--finetune-epochs", "1", "--cache-dir", engine_cfg.cache_dir]
    got = subprocess.run(args, capture_output=True, text=True, preexec_fn=limit, timeout=300)
    assert got.returncode == 2 and len(got.stderr.strip().splitlines()) == 1, got.stderr[-2000:]
    assert f"{str(out / 'model.pt')!r} could not be written" in got.stderr and "Traceback" not in got.stderr
    assert not out.exists()


def test_a_temp_folder_too_deep_for_rays_sockets_is_one_line_before_ray(tmp_path, cli_here):
    deep = tmp_path / ("d" * 60)
    deep.mkdir()
    got = cli_here("search", "--storage", str(tmp_path / "res"), "--trials", "2", env={"RAY_TMPDIR": str(deep)})
    assert got.returncode == 2 and len(got.stderr.strip().splitlines()) == 1, got.stderr
    assert "too deep for Ray's sockets" in got.stderr and "RAY_TMPDIR" in got.stderr
    assert not (tmp_path / "res").exists() and not (deep / f"ap-ray-{os.getuid()}").exists()
