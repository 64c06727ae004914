"""What leaves a study: its trials as CSV or JSON rows, and finalize's files attached to it for optuna-dashboard."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.artifacts import upload_artifact
from optuna.trial import FrozenTrial

from fer_search.errors import UserError, first_line
from fer_search.status import full_params, retried_from, trial_seconds
from fer_search.storage import open_artifact_store

log = logging.getLogger("fer_search")
FORMATS = ("csv", "json")
# The trial user attributes a row carries; the others (checkpoint ids, devices, speeds) are the workers' own.
USER_ATTRS = ("baseline", "best_epoch", "epochs_run", "seed", "fail_reason")
# finalize's files shown on the study's page in optuna-dashboard, with their types: Python's mimetypes
# takes .pt for "application/vnd.snesdev-page-table".
FINAL_ARTIFACTS = {"model.pt": "application/octet-stream", "report.html": "text/html"}
ARTIFACTS_ATTR_PREFIX = "artifacts:"  # Optuna's key of an attachment in the study's system attributes


def export_format(fmt: str | None, out: Path | None) -> str:
    """csv or json: --format when given, else --out's suffix, else csv; UserError naming an unknown one."""
    if fmt is not None:
        if fmt.lower() not in FORMATS:
            raise UserError(f"--format {fmt!r}: unknown format (use csv or json)")
        return fmt.lower()
    if out is None:
        return "csv"
    suffix = out.suffix.lower().lstrip(".")
    if suffix not in FORMATS:
        told = f"the suffix {out.suffix!r}" if out.suffix else "a name without a suffix"
        raise UserError(f"--out {out}: cannot tell the format from {told} (name it .csv or .json, or give --format)")
    return suffix


def export_trials(study: optuna.Study, fmt: str) -> str:
    """Every trial of the study as CSV (a header, then a row per trial) or JSON (a list of objects)."""
    rows = trial_rows(study)
    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]) if rows else trial_columns([]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """A row per trial, all with the same columns (trial_columns), values of JSON's types, None where missing.

    The model is Optuna's Study.trials_dataframe(), whose column names these are; it needs pandas,
    which fer-search does not otherwise use, so the rows are built here. Unlike it: `value` keeps
    its name whatever the study's metric names (studies made before they were set export alike),
    `duration` is in seconds, datetimes are ISO 8601 text (naive: the workers' local time), params
    are the trial's full TrialParams (fixed values included), and only USER_ATTRS are kept.
    """
    trials = study.get_trials(deepcopy=False)
    params = [full_params(t) for t in trials]
    names = sorted({name for p in params for name in p})
    return [dict(zip(trial_columns(names), _row(t, p, names), strict=True)) for t, p in zip(trials, params)]


def trial_columns(param_names: list[str]) -> list[str]:
    """The export's columns, in trials_dataframe's order."""
    return [
        "number",
        "value",
        "datetime_start",
        "datetime_complete",
        "duration",
        *(f"params_{name}" for name in param_names),
        *(f"user_attrs_{name}" for name in USER_ATTRS),
        "retried_from",
        "state",
    ]


def _row(trial: FrozenTrial, params: dict[str, Any], param_names: list[str]) -> list[Any]:
    start, complete = trial.datetime_start, trial.datetime_complete
    return [
        trial.number,
        _finite(trial.value),
        _iso(start),
        _iso(complete),
        trial_seconds(trial),
        *(_finite(params.get(name)) for name in param_names),
        *(_user_attr(trial, name) for name in USER_ATTRS),
        retried_from(trial),
        trial.state.name,
    ]


def _user_attr(trial: FrozenTrial, name: str) -> Any:
    if name == "baseline":  # a flag: absent means not the baseline
        return bool(trial.user_attrs.get(name, False))
    return _finite(trial.user_attrs.get(name))


def _finite(value: Any) -> Any:
    """None for NaN and infinities, which JSON cannot hold."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def attach_final_files(study: optuna.Study, artifacts: Path, folder: Path) -> None:
    """Attaches finalize's model.pt and report.html (in `folder`) to the study, in its artifact store, for
    optuna-dashboard; a store or database that refuses is one logged warning, nothing more.

    A file attached before under the same name is overwritten in place, keeping its id, rather than
    attached anew: Optuna has no way to unlink an attachment from a study, so a re-run finalize would
    otherwise add two entries each time, the old ones pointing at removed or stale files. In place,
    the entry an upload interrupted before its bytes were written (Optuna records the entry first) is
    filled by the next finalize.
    """
    try:
        store = open_artifact_store(artifacts)
        attached = attached_ids(study)
        for name, mimetype in FINAL_ARTIFACTS.items():
            path = folder / name
            for artifact_id in attached.get(name, []):
                with open(path, "rb") as file:
                    store.write(artifact_id, file)
            if name not in attached:
                upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=study, mimetype=mimetype)
    except (UserError, OSError, sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as e:
        log.warning(
            "%s not attached to study %r in the artifact store %s (%s); the files in %s are complete",
            " and ".join(FINAL_ARTIFACTS),
            study.study_name,
            artifacts,
            first_line(e.__cause__ or e),
            folder,
        )


def attached_ids(study: optuna.Study) -> dict[str, list[str]]:
    """The ids of the files attached to the study (not to its trials), by file name.

    Read from the study's system attributes rather than with optuna.artifacts.get_all_artifact_meta:
    optuna-dashboard marks an artifact deleted on its page with a null entry, on which
    get_all_artifact_meta fails (TypeError; Optuna 5.0, optuna-dashboard 0.21).
    """
    # Optuna's own artifact functions reach the study's storage and id the same way; Study has no public form.
    system_attrs = study._storage.get_study_system_attrs(study._study_id)
    ids: defaultdict[str, list[str]] = defaultdict(list)
    for key, entry in system_attrs.items():
        meta = json.loads(entry) if key.startswith(ARTIFACTS_ATTR_PREFIX) and isinstance(entry, str) else None
        if isinstance(meta, dict) and isinstance(meta.get("filename"), str):
            ids[meta["filename"]].append(str(meta["artifact_id"]))
    return dict(ids)
