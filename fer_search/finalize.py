"""Finalize: retrain the best trial and the baseline over seeds, evaluate on the test set, report."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch

from fer_search.config import Config
from fer_search.data import CLASSES, FerData, load_configured
from fer_search.errors import UserError
from fer_search.metrics import classification_report
from fer_search.predict import probabilities, save_model, write_atomic
from fer_search.report import SeedRun, write_reports
from fer_search.search import provenance
from fer_search.space import BASELINE, TrialParams, params_from_trial
from fer_search.storage import load_existing_study
from fer_search.train import TrainSettings, configure_cpu_threads, model_on_cpu, resolve_device, train_model

REPORTED_BASELINE = 0.61356  # the documented project's figure, measured on a split that is not this test folder

Say = Callable[[str], None]


def finalize_study(config: Config, command: str, say: Say) -> str:
    """Retrain, evaluate on PrivateTest (and the whole test folder), write the reports to config.final_dir.

    `command` is the command line of this finalize, recorded so that the report says how to reproduce it.
    """
    study = load_existing_study(config.study.storage, config.study.name)
    best = best_complete_trial(study)
    device = resolve_device(config.run.device)
    # Checked before any data is decoded or seed trained: a bad --out must not cost a training run.
    out = prepared_folder(config.final_dir, "output")
    runs_dir = prepared_folder(resume_dir(config), "resume")
    searched_on = study.user_attrs.get("data_path")
    if not config.data.path.exists() and searched_on and Path(searched_on).exists():
        raise UserError(f"{config.data.path}: no such file or folder; study {study.study_name!r} was searched on "
                        f"{searched_on}: pass --data {searched_on}")
    # Train and val come from the search's cache in seconds; the test split is decoded only once they match.
    check_same_data(study, load_configured(config.data), config.data.path)
    data = load_configured(config.data, with_test=True)
    configure_cpu_threads(1)
    epochs = config.finalize.epochs or int(study.user_attrs.get("epochs", config.run.epochs))
    seeds = [config.run.seed + i for i in range(config.finalize.seeds)]
    best_params = params_from_trial(best.user_attrs)

    def runs_of(kind: str, params: TrialParams) -> list[tuple[SeedRun, dict[str, torch.Tensor]]]:
        return [seed_run(kind, params, seed, epochs, data, device, runs_dir, say) for seed in seeds]

    best_runs = runs_of("best", best_params)
    baseline_runs = runs_of("baseline", BASELINE) if config.finalize.baseline else []
    shipped, shipped_state = max(best_runs, key=lambda rs: (rs[0].val_acc, -rs[0].seed))
    meta = {"study": study.study_name, "trial": best.number, "seed": shipped.seed, "best_epoch": shipped.best_epoch,
            "fingerprints": data.fingerprints}
    save_model(out / "model.pt", shipped_state, best_params, CLASSES, meta)
    metrics = {
        "shipped_seed": shipped.seed, "epochs": epochs, "seeds": seeds,
        "best_trial": {"number": best.number, "value": best.value, "params": best_params.to_dict()},
        "best": aggregate([r for r, _ in best_runs]),
        "baseline": aggregate([r for r, _ in baseline_runs]) if baseline_runs else None,
        "baseline_reported": {"accuracy": REPORTED_BASELINE, "note": "reported by the documented project, on its own split"},
        "protocol": {"train": "Training", "val": "PublicTest" if data.val_is_public_test else "10% of train",
                     "test": "PrivateTest" if data.val_is_public_test else "test/",
                     "test_all": "PublicTest + PrivateTest (includes the validation split)" if data.val_is_public_test
                     else "test/ (same as test)"},
        "data": {"path": str(config.data.path), "fingerprints": data.fingerprints},
        # "run" is None for a study created before `run` recorded its command line.
        "commands": {"run": study.user_attrs.get("command"), "finalize": command},
        **provenance(),
    }
    write_atomic(out / "metrics.json", json.dumps(metrics, indent=2).encode())
    baseline_same_seed = next((r for r, _ in baseline_runs if r.seed == shipped.seed), None)
    written = write_reports(out, metrics, shipped, baseline_same_seed, data.test.x[:, 0].numpy(),
                            data.test.y.numpy(), CLASSES, study)
    return summary_text(metrics, out, [out / "model.pt", out / "metrics.json", *written])


def resume_dir(config: Config) -> Path:
    """Finished seeds of an interrupted finalize: kept with the study, not in the folder users take away."""
    return config.study.dir / config.study.name / "finalize-runs"


def prepared_folder(path: Path, what: str) -> Path:
    """`path`, created if need be; UserError naming it when it cannot be or cannot be written to."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"{path}: cannot create the {what} folder ({error.strerror or type(error).__name__})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{path}: cannot write to the {what} folder (permission denied)")
    return path


def best_complete_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    try:
        return study.best_trial
    except ValueError:
        raise UserError(f"study {study.study_name!r} has no complete trial yet: run `fer-search run` first") from None


def check_same_data(study: optuna.Study, data: FerData, path: Path) -> None:
    """The retrained model must see the data its trial was searched on."""
    stored = study.user_attrs.get("fingerprints", {})
    changed = [s for s in ("train", "val") if stored.get(s) != data.fingerprints[s]]
    if changed:
        raise UserError(f"data at {path} differs from the data study {study.study_name!r} was searched on "
                        f"({', '.join(changed)} split fingerprint); pass the study's data with --data")


def seed_run(kind: str, params: TrialParams, seed: int, epochs: int, data: FerData, device: torch.device,
             runs_dir: Path, say: Say) -> tuple[SeedRun, dict[str, torch.Tensor]]:
    """Train one seed and evaluate it, or reuse the finished run from an interrupted finalize."""
    key = {"params": params.to_dict(), "epochs": epochs, "fingerprints": data.fingerprints}
    # Named by its key too: the folder is the study's, shared by finalizes with other --epochs or --out.
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = runs_dir / f"{kind}-seed{seed}-{digest}.pt"
    cached = _load_run(path, key)
    if cached is not None:
        say(f"{kind} seed {seed}: reusing the finished run in {path}")
        return cached

    def on_epoch(record: Any, _checkpoint: Any) -> None:
        say(f"{kind} seed {seed}: epoch {record.epoch}/{epochs} val_acc {record.val_acc:.4f}")

    result = train_model(params, data, TrainSettings(epochs=epochs, seed=seed, device=device), on_epoch=on_epoch)
    model = model_on_cpu(result.model, result.best_state)
    private_probs = probabilities(model, data.test.x)
    all_x, all_y = data.test.x, data.test.y
    if data.val_is_public_test:
        all_x, all_y = torch.cat([data.val.x, data.test.x]), torch.cat([data.val.y, data.test.y])
    all_pred = probabilities(model, all_x).argmax(1)
    run = SeedRun(
        kind=kind, seed=seed, best_epoch=result.best_epoch, val_acc=result.best_val_acc,
        history=[dataclasses.asdict(r) for r in result.history],
        private_test=classification_report(data.test.y.numpy(), private_probs.argmax(1).numpy(), CLASSES),
        test_all=classification_report(all_y.numpy(), all_pred.numpy(), CLASSES),
        test_pred=private_probs.argmax(1).tolist(), test_conf=private_probs.max(1).values.tolist(),
    )
    buffer = io.BytesIO()
    torch.save({"key": key, "run": json.dumps(dataclasses.asdict(run)), "state": result.best_state}, buffer)
    write_atomic(path, buffer.getvalue())
    return run, result.best_state


def _load_run(path: Path, key: dict[str, Any]) -> tuple[SeedRun, dict[str, torch.Tensor]] | None:
    if not path.is_file():
        return None
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a damaged file is retrained, never fatal
        return None
    if doc.get("key") != key:
        return None
    return SeedRun(**json.loads(doc["run"])), doc["state"]


def aggregate(runs: list[SeedRun]) -> dict[str, Any]:
    """Per seed, and mean / standard deviation (ddof 1; None for one seed) over seeds, elementwise for matrices."""
    per_seed = {str(r.seed): {"val_acc": r.val_acc, "best_epoch": r.best_epoch,
                              "private_test": r.private_test, "test_all": r.test_all} for r in runs}
    mean = {split: _over_seeds([getattr(r, split) for r in runs], lambda v: np.mean(v, axis=0))
            for split in ("private_test", "test_all")}
    std = None
    if len(runs) > 1:
        std = {split: _over_seeds([getattr(r, split) for r in runs], lambda v: np.std(v, axis=0, ddof=1))
               for split in ("private_test", "test_all")}
    return {"per_seed": per_seed, "mean": mean, "std": std}


def _over_seeds(reports: list[dict[str, Any]], stat: Callable[[np.ndarray], np.ndarray]) -> dict[str, Any]:
    """`stat` over the seeds' axis 0 of each figure of classification_report (support and n are the same for all)."""
    def over(values: list[Any]) -> Any:
        return np.asarray(stat(np.asarray(values, dtype=float))).tolist()

    return {
        "accuracy": over([r["accuracy"] for r in reports]),
        "macro_f1": over([r["macro_f1"] for r in reports]),
        "per_class": {c: {m: over([r["per_class"][c][m] for r in reports]) for m in ("precision", "recall", "f1")}
                      for c in reports[0]["per_class"]},
        "confusion": over([r["confusion"] for r in reports]),
    }


def summary_text(metrics: dict[str, Any], out: Path, files: list[Path]) -> str:
    def line(name: str, agg: dict[str, Any] | None) -> str:
        if agg is None:
            return f"{name}: not retrained (--no-baseline)"
        parts = []
        for split in ("private_test", "test_all"):
            m = agg["mean"][split]["accuracy"]
            s = "" if agg["std"] is None else f" ± {agg['std'][split]['accuracy']:.4f}"
            parts.append(f"{split} {m:.4f}{s}")
        seeds = len(agg["per_seed"])
        return f"{name}: " + ", ".join(parts) + f" ({seeds} seed{'' if seeds == 1 else 's'})"

    bt = metrics["best_trial"]
    return "\n".join([
        line(f"best trial {bt['number']} (val {bt['value']:.4f})", metrics["best"]),
        line("baseline", metrics["baseline"]),
        f"shipped seed {metrics['shipped_seed']}; wrote {len(files)} files to {out}",
    ])
