"""Create or join a study: provenance, the baseline first, the `ready` mark, the mismatch check, sampler, pruner."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import platform
import random
import socket
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
import torch

from fer_search.config import Config, PrunerConfig
from fer_search.errors import UserError
from fer_search.files import seed_of
from fer_search.model import BASELINE
from fer_search.space import optuna_params

log = logging.getLogger("fer_search")
# The objective's name, as the live lines, finalize and the report call it: optuna-dashboard and
# Optuna's plots label the value with it.
METRIC_NAME = "val_acc"


def study_record(config: Config, fingerprints: dict[str, str]) -> dict[str, Any]:
    """What a study is created with (its data's fingerprints, space and epochs), compared on every later `run`."""
    return {"fingerprints": fingerprints, "space": config.space.to_dict(), "epochs": config.run.epochs}


def provenance() -> dict[str, Any]:
    """Versions and git commit of what runs now: recorded in a study and in finalize's metrics."""
    commit, dirty = None, None
    here = Path(__file__).resolve().parent
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
        if commit:
            dirty = bool(
                subprocess.run(
                    ["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, timeout=10
                ).stdout.strip()
            )
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "optuna": optuna.__version__,
            "fer-search": package_version("fer-search"),
            "sqlalchemy": package_version("sqlalchemy"),
        },
        "git": {"commit": commit, "dirty": dirty},
    }


def package_version(name: str) -> str | None:
    """The installed version of a distribution, None where it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def ensure_study(
    config: Config,
    storage: optuna.storages.BaseStorage,
    record: dict[str, Any],
    pruner: optuna.pruners.BasePruner | None = None,
    command: str | None = None,
) -> optuna.Study:
    """Create the study (baseline enqueued, then `ready`), or join it and check it matches.

    Only the process whose create_study succeeded sets the study up: enqueue_trial's
    skip_if_exists is not atomic across processes, so two workers starting together could
    both enqueue the baseline. A joiner waits for `ready` and, if its creator died, finishes.
    """
    name = config.study.name
    try:
        study = optuna.create_study(
            study_name=name, storage=storage, direction="maximize", pruner=pruner, load_if_exists=False
        )
        _set_up(study, config, record, command)
        return study
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, pruner=pruner)
    # Joiners of a creator that died time out at random moments, so the first to finish the setup
    # is usually seen by the others (whose check for a baseline comes after), not raced by them.
    if not _wait_until_ready(study, config.run.ready_timeout_s * (1 + random.random())):
        log.warning("study %s was never marked ready by its creator; finishing its setup", name)
        _set_up(study, config, record, command)
    check_study_matches(study, record, config.run.ignore_mismatch)
    if study.metric_names is None:  # a study created before fer-search named its objective
        name_metric(study)
    return study


def _set_up(study: optuna.Study, config: Config, record: dict[str, Any], command: str | None) -> None:
    made_by = {"data_path": str(config.data.path), **({"command": command} if command else {})}
    for key, value in {**record, **provenance(), **made_by}.items():
        study.set_user_attr(key, value)
    name_metric(study)
    if not any(t.user_attrs.get("baseline") for t in study.get_trials(deepcopy=False)):
        params = optuna_params(BASELINE, config.space)
        if params is None:
            study.set_user_attr("baseline_excluded", True)
        else:
            study.enqueue_trial(params, user_attrs={"baseline": True})
    study.set_user_attr("ready", True)


def name_metric(study: optuna.Study) -> None:
    """Names the study's objective METRIC_NAME."""
    with warnings.catch_warnings():  # Optuna flags set_metric_names as experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([METRIC_NAME])


def _wait_until_ready(study: optuna.Study, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not study.user_attrs.get("ready"):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)
    return True


def check_study_matches(study: optuna.Study, record: dict[str, Any], ignore: bool) -> None:
    """UserError naming what differs from the study's creation, unless ignored."""
    stored = study.user_attrs
    current = json.loads(json.dumps(record))  # tuples -> lists, as the storage returns them
    changes = []
    for split, fp in current["fingerprints"].items():
        if stored.get("fingerprints", {}).get(split) != fp:
            changes.append(f"data ({split} split fingerprint)")
    changed_keys = [k for k, v in current["space"].items() if stored.get("space", {}).get(k) != v]
    if changed_keys:
        changes.append(f"search space ({', '.join('space.' + k for k in changed_keys)})")
    if stored.get("epochs") != current["epochs"]:
        changes.append(f"epochs ({stored.get('epochs')} -> {current['epochs']})")
    # Optuna stores a parameter's distribution once: its choices, or a range's log scale, cannot change.
    stored_space = stored.get("space", {})
    fixed = [k for k in changed_keys if _incompatible(stored_space.get(k), current["space"][k])]
    if fixed:
        raise UserError(
            f"study {study.study_name!r}: the choices or log scale of "
            f"{', '.join('space.' + k for k in fixed)} changed, which an Optuna study cannot follow; "
            "use --study NAME for a new study"
        )
    if changes and not ignore:
        raise UserError(
            f"study {study.study_name!r} was created with different {'; '.join(changes)}: "
            "pass --ignore-mismatch to continue it anyway, or --study NAME for a new study"
        )
    if changes:
        log.warning("continuing study %s despite changed %s", study.study_name, "; ".join(changes))


def _incompatible(stored: Any, current: Any) -> bool:
    """Two searched specs of one parameter that Optuna cannot hold in one study: categoricals (lists
    of more than one choice) with other choices, or ranges ({low, high, log}) with another log scale."""
    if all(isinstance(spec, list) and len(spec) > 1 for spec in (stored, current)):
        return stored != current
    if all(isinstance(spec, dict) for spec in (stored, current)):
        return stored.get("log") != current.get("log")
    return False


def make_sampler(base_seed: int, worker_index: int, trials_so_far: int) -> optuna.samplers.TPESampler:
    """TPE seeded per worker so that no two workers, here or on other hosts, draw in lock-step, and by
    the number of trials the study held when the worker joined it, so that a re-run does not draw
    again what the first run drew (seeded alike, its random start-up trials would repeat them).

    Optuna 5's TPE defaults are multivariate with constant liar; group=True models the
    conditional parameters (dropout rates that exist only for some patterns) separately.
    """
    key = f"{base_seed}/{socket.gethostname()}/{worker_index}/{trials_so_far}"
    return optuna.samplers.TPESampler(seed=seed_of(key), group=True)


def make_pruner(config: PrunerConfig, epochs: int) -> optuna.pruners.BasePruner:
    """The configured pruner; patience > 0 wraps it in Optuna's PatientPruner."""
    pruner: optuna.pruners.BasePruner
    if config.kind in ("percentile", "median"):  # the median is the 50th percentile
        pruner = optuna.pruners.PercentilePruner(
            50.0 if config.kind == "median" else config.percentile,
            n_startup_trials=config.startup_trials,
            n_warmup_steps=config.warmup_epochs,
        )
    elif config.kind == "hyperband":
        pruner = optuna.pruners.HyperbandPruner(
            min_resource=config.min_epochs, max_resource=epochs, reduction_factor=config.reduction_factor
        )
    else:
        return optuna.pruners.NopPruner()
    if config.patience > 0:
        pruner = optuna.pruners.PatientPruner(pruner, patience=config.patience, min_delta=config.min_delta)
    return pruner


def quiet_optuna() -> None:
    """Optuna logs every trial at INFO and flags the heartbeat/retry API as experimental; the live
    progress line and the final summary say what a user needs."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
