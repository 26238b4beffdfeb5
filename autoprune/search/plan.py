"""Every check of a search that needs no Ray, data or training: names, budget, resources,
output locations, the tracking store, the cluster address and what ``--resume`` may change.
:func:`prepare` turns a :class:`~autoprune.config.SearchConfig` into a checked :class:`Plan`."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from ..config import DEFAULT_EPOCHS, DEFAULT_STORAGE, STRUCTURES, SearchConfig
from ..errors import AutopruneError
from ..rayenv import check_token, private_temp_dir
from .address import check_address, resolve_address

STATE_FILE = "autoprune-search.json"  # the resolved config and MLflow ids, for --resume


@dataclass(kw_only=True)
class Plan:
    """A checked, resolved search: what ``search`` runs."""

    config: SearchConfig
    name: str
    path: str  # <storage>/<name>: an absolute folder, or a bucket URI (paths.is_uri)
    tracking_uri: str
    address: str | None
    trials: int
    scheduler: str
    out: Path
    structures: tuple[str, ...]  # what the space may sample (--structure, or the space's own)
    grid: dict[str, list] | None = None
    local_cpus: int = 0
    local_gpus: int = 0
    epochs: int = DEFAULT_EPOCHS  # training epochs per trial (--epochs, or the searcher's default)
    metric: str = "val_acc"  # what picks the best trial: --metric, the task's metric, or an agent's reward
    score: str = "val_acc"  # the task's metric on the validation split (val_acc, val_miou, val_rmse ...)
    storage: str = ""  # --storage, checked: an absolute folder or a bucket URI
    finished: list[dict] = field(default_factory=list)  # a resume: the trials' records (search.journal), checked


RESUME_MAY_CHANGE = ("name", "storage", "resume", "out", "address", "progress", "engine.progress")


def saved_config(name: str, storage: str) -> SearchConfig | None:
    """The checked settings of the search ``<storage>/<name>``, or None if there is none."""
    from ..paths import join, read_text
    from ..schema import from_dict, parse_json

    state = join(storage, name, STATE_FILE)
    text = read_text(state)
    if text is None:
        return None
    try:
        data = parse_json(text, "it")["config"]
    except (AutopruneError, KeyError, TypeError) as exc:
        raise AutopruneError(f"{str(state)!r} is not a readable search state ({exc}); it cannot be resumed") from None
    try:
        return from_dict(SearchConfig, data, f"saved search {str(state)!r}")
    except AutopruneError as exc:
        raise AutopruneError(
            f"{str(state)!r} holds settings that are no longer valid ({exc}); it cannot be resumed"
        ) from None


_CODE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")  # package.module:attribute


def check_named_code(config: SearchConfig, saved: SearchConfig, name: str) -> None:
    """A resume imports no module its command line does not name: a saved setting that names
    code (``--space pkg.mod:fn``, ``--task pkg.mod:fn``) must be given again, as it was."""
    from ..schema import flat_fields

    mine = flat_fields(config)
    for key, (value, flag) in flat_fields(saved).items():
        if isinstance(value, str) and _CODE.match(value) and mine[key][0] != value:
            raise AutopruneError(
                f"search {name!r} was saved with {flag or key} {value!r}, code from a module; a resume imports only "
                f"the code its command line names: add {flag or key} {value}"
            )


def resume_conflicts(config: SearchConfig, saved: SearchConfig) -> list[str]:
    """Settings of ``config`` that a resumed search could not honour: those set (not None)
    and different from the saved ones. A config that sets nothing beyond the defaults (the
    Python API's ``SearchConfig(name=..., resume=True)``) takes the saved settings."""
    from ..schema import flat_fields
    from ..tracking.store import resolve_tracking_uri

    mine, theirs, default = flat_fields(config), flat_fields(saved), flat_fields(SearchConfig())
    asked = [k for k in mine if k not in RESUME_MAY_CHANGE]
    if all(mine[k][0] == default[k][0] for k in asked):
        return []
    out = []
    for key in asked:
        value, flag = mine[key]
        if key == "tracking_uri" and value is not None:
            value = resolve_tracking_uri(value)
        if value is not None and value != theirs[key][0]:
            out.append(f"{flag or key} {value!r} (saved: {theirs[key][0]!r})")
    return out


def prepare(config: SearchConfig) -> Plan:
    """Every check that needs no Ray, data or training: names, budget, resources on this
    machine, the output locations, the tracking store and the cluster address. A resumed
    search takes its saved configuration: only ``out``, ``address`` and the progress display
    may change; other differences are refused. Its trials' records are read and checked here."""
    from autoprune.search_spaces import get_space

    from .. import engine
    from ..engine.tasks import check_task_config
    from ..tracking import store
    from .searchers import SEARCHERS, foreign_settings

    name, storage, path, config = _name_and_settings(config)
    finished = _finished(name, path) if config.resume else []
    spec = SEARCHERS.get(config.searcher)
    space = get_space(config.space)
    check_task_config(config.engine.task)
    engine.resolve_device(config.engine.device)
    if spec.needs_grid and not hasattr(space, "grid"):
        raise AutopruneError(
            f"searcher {config.searcher!r} needs a space with a grid (such as 'criteria'); {config.space!r} has none"
        )
    fixed = getattr(space, "structure", None)
    if config.structure not in (None, "any") and fixed and config.structure != fixed:
        raise AutopruneError(
            f"--structure {config.structure} does not fit space {config.space!r}, which prunes {fixed} only"
        )
    structures = search_structures(config.structure, fixed)
    if config.budget.kind == "latency" and "unstructured" in structures:
        raise AutopruneError(
            "--budget-latency needs channel pruning: weight masks leave every tensor its dense shape, so dense "
            f"kernels run them at the dense model's speed; {_which(config, fixed)} would search masks. "
            "Use --budget-flops or --budget-params for masks"
        )
    foreign = foreign_settings(config)
    if foreign:
        raise AutopruneError(foreign)
    resolved = config.resolved(spec.trials, spec.epochs, spec.scheduler)
    trials, epochs, scheduler = resolved.trials, resolved.epochs, resolved.scheduler
    spec.hooks().check(config, structures, trials)
    if epochs == 0 and config.scheduler == "asha":
        raise AutopruneError("--scheduler asha stops trials between epochs; with --epochs 0 use --scheduler none")
    if scheduler == "asha" and spec.multi_objective:
        raise AutopruneError(
            f"--scheduler asha stops trials on one metric; searcher {config.searcher!r} optimises several: "
            "use --scheduler none"
        )
    out = _outputs(config, name, path)
    tracking_uri = store.resolve_tracking_uri(config.tracking_uri)
    store.check_tracking_uri(tracking_uri)
    check_token()
    address = resolve_address(config.address or os.environ.get("RAY_ADDRESS") or None)
    if address:
        check_address(address)
    local_cpus = local_gpus = 0
    if not address:
        private_temp_dir(create=False)  # Ray's sockets fit under it
        local_cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        local_gpus = gpu_count()
        check_fits(config, local_cpus, local_gpus, "this machine")
    return Plan(
        config=config,
        name=name,
        path=path,
        tracking_uri=tracking_uri,
        address=address,
        trials=trials,
        scheduler=scheduler,
        out=out.resolve(),
        structures=structures,
        local_cpus=local_cpus,
        local_gpus=local_gpus,
        epochs=epochs,
        metric=spec.metric or config.metric or "val_acc",  # the task's metric once it is built (resolve_metric)
        storage=storage,
        finished=finished,
    )


def resolve_metric(plan: Plan, task) -> None:
    """Set what picks the best trial and the task's metric once the task is built: ``--metric``
    must be the task's (``val_acc`` for classification, ``val_miou``, ``val_rmse`` ...) or
    ``val_loss``; without it, the task's metric (in its own direction)."""
    from .searchers import SEARCHERS

    spec = SEARCHERS.get(plan.config.searcher)
    score = task.metric_key()
    asked = plan.config.metric
    allowed = (score, "val_loss")
    if asked is not None and asked not in allowed:
        raise AutopruneError(
            f"unknown --metric {asked!r} for task {task.name!r}, which reports {score}; choose one of "
            f"{', '.join(repr(a) for a in allowed)}"
        )
    plan.score = score
    plan.metric = spec.metric or asked or score


def _outputs(config: SearchConfig, name: str, path: str) -> Path:
    """The checked ``--out`` (and the dense-model cache). The best model is written locally;
    with a bucket ``--storage`` it is also copied to ``<path>/best``. A new search's ``--out``
    must be new or empty (a resume writes over its own best model)."""
    from .. import engine
    from ..paths import check_output_dir, is_uri

    local = Path(DEFAULT_STORAGE).expanduser() / name if is_uri(path) else Path(path)
    asked = bool(config.out) and not config.resume
    where = Path(config.out).resolve() if config.out else local / "best"
    out = check_output_dir(where, "--out", fresh=asked, instead="leave --out out (NAME/best under --storage)")
    if not config.engine.checkpoint:
        check_output_dir(
            engine.cache_dir(config.engine), "--cache-dir" if config.engine.cache_dir else "the dense-model cache"
        )
    return out


def _finished(name: str, path: str) -> list[dict]:
    """The records of the trials a resumed search has finished, each checked (search.journal)."""
    from ..paths import names
    from . import journal

    if journal.TRIALS not in names(path) and "completed-trials" in names(path):
        raise AutopruneError(
            f"search {name!r} was made by an earlier autoprune, whose resume read Ray Tune's pickles; this one reads "
            "only its own trial records, which that search lacks: start a new search"
        )
    return journal.load(path)


def _name_and_settings(config: SearchConfig) -> tuple[str, str, str, SearchConfig]:
    """The search's name, its checked storage location and folder, and its settings: a
    resumed search's saved ones (only ``out``, ``address`` and the progress display may
    change); a new search's name must be free."""
    from ..paths import check_location, join, names
    from .lease import LEASE, check_free

    if config.resume and not config.name:
        raise AutopruneError("--resume needs --name: the name of the search to continue")
    name = config.name or datetime.now().strftime("search-%Y%m%d-%H%M%S")
    storage = check_location(config.storage, "--storage")
    path = join(storage, name)
    check_free(name, path)  # a live search of this name: refused first, naming it
    if config.resume:
        saved = saved_config(name, config.storage)
        if saved is None:
            raise AutopruneError(f"no search named {name!r} to resume under {storage!r} ({STATE_FILE} missing)")
        check_named_code(config, saved, name)
        conflicts = resume_conflicts(config, saved)
        if conflicts:
            raise AutopruneError(
                f"--resume continues search {name!r} with its saved settings, but these differ: "
                f"{'; '.join(conflicts)}. Leave them out, or start a new search under another --name"
            )
        config = dataclasses.replace(
            saved, resume=True, out=config.out or saved.out, address=config.address, progress=config.progress
        )
    elif set(names(path)) - {LEASE}:
        raise AutopruneError(
            f"a search named {name!r} already exists in {storage!r}; pass --resume to continue it, "
            "or choose another --name"
        )
    return name, storage, path, config


def search_structures(asked: str | None, fixed: str | None) -> tuple[str, ...]:
    """What a search's space may sample: ``--structure`` (``any``: both), else the space's
    own, else channel (a really faster model)."""
    if fixed:
        return (fixed,)
    if asked == "any":
        return STRUCTURES
    return (asked or "channel",)


MASKS_NOTE = (
    "note: weight masks (unstructured) run no faster on dense kernels: they need sparse kernels or hardware to "
    "turn their FLOPs into speed"
)


def _which(config: SearchConfig, fixed: str | None) -> str:
    return f"--structure {config.structure}" if config.structure else f"space {config.space!r}"


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_fits(config: SearchConfig, cpus: float, gpus: float, where: str) -> None:
    if config.cpus_per_trial > cpus:
        raise AutopruneError(f"--cpus-per-trial {config.cpus_per_trial:g} is more than {where} has ({cpus:g} CPUs)")
    if config.gpus_per_trial > gpus:
        raise AutopruneError(
            f"--gpus-per-trial {config.gpus_per_trial:g} is more than {where} has ({gpus:g} GPUs)"
            + ("; leave it at 0 to run on the CPU" if not gpus else "")
        )


def saved_settings(plan: Plan, workers: int) -> dict:
    """The search's settings as ``--resume`` reads them back (STATE_FILE); MLflow logs
    :func:`logged_settings` of them."""
    from ..paths import is_uri

    config = plan.config
    saved = dataclasses.asdict(config)
    saved.update(
        name=plan.name,
        trials=plan.trials,
        # a bucket search keeps no local path: a resume elsewhere writes under its own default
        out=str(plan.out) if config.out or not is_uri(plan.path) else None,
        scheduler=plan.scheduler,
        concurrency=workers,
        tracking_uri=plan.tracking_uri,
        storage=plan.storage,
    )
    return saved


def search_params(plan: Plan, saved: dict, model: str) -> tuple[dict[str, str], dict]:
    """The search run's params (:func:`logged_settings`) and the runs table's view of its
    trials (:func:`autoprune.tracking.view.trials_view`)."""
    from ..tracking import store
    from ..tracking.view import trials_view
    from .searchers import SEARCHERS

    params = store.flat_params("", logged_settings(plan, saved, model), skip=store.SEARCH_NOISE)
    agent = SEARCHERS.get(plan.config.searcher).agent
    return params, trials_view(plan.score, plan.config.budget.kind, agent, len(plan.structures) > 1)


def logged_settings(plan: Plan, saved: dict, model: str) -> dict:
    """The search's settings as its MLflow run's params: resolved (the epochs per trial, the
    structures searched, the task's ``model``, an agent's warm-up episodes) and only those
    that apply: an agent (``--searcher amc``) has its own metric and no space, the samplers
    no agent; where results are written says nothing about them."""
    from .searchers import SEARCHERS

    config = plan.config
    settings = {k: v for k, v in saved.items() if k not in ("out", "agent")}
    settings.update(epochs=plan.epochs, structure="/".join(plan.structures), metric=plan.metric)
    settings["engine"] = {**saved["engine"], "task": {**saved["engine"]["task"], "model": model}}
    if SEARCHERS.get(config.searcher).agent:
        del settings["space"], settings["metric"]
        settings["agent"] = dataclasses.asdict(config.agent.resolved(plan.trials))
    return settings


def check_latency_batch(task, config: SearchConfig) -> None:
    """A ``--latency-batch`` above one must fit in the driver device's memory (it times the
    dense and the final model there), and ``--latency-runtime`` must be installed for it,
    checked before the lease, Ray and training."""
    from ..engine import check_runtime, resolve_device
    from ..engine.measure import check_latency_batch as fits

    check_runtime(config.engine.measure.runtime, resolve_device(config.engine.device))
    batch = config.engine.measure.latency_batch
    if batch > 1:
        model = task.model_factory().eval()
        fits(model, task.example_input(), batch, resolve_device(config.engine.device))
