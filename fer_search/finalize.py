"""Finalize: retrain the best trial and the baseline over seeds, evaluate on the test set, report."""

from __future__ import annotations

import dataclasses
import io
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import optuna
import torch
from optuna.trial import TrialState

from fer_search.config import Config
from fer_search.data import CLASSES, FerData, SplitData, load_configured
from fer_search.errors import Crashed, UserError, first_line
from fer_search.export import attach_final_files
from fer_search.figures import seeds_list
from fer_search.files import made_folder, sha256_json, write_file
from fer_search.metrics import classification_report
from fer_search.model import BASELINE, TrialParams
from fer_search.predict import (
    MAX_MEMBERS,
    MODEL_FILE_LIMIT,
    combined_logits,
    compact_state,
    model_from_state,
    save_model,
    stored_bytes,
)
from fer_search.processes import (
    USER_ERROR,
    ChildError,
    ended_interrupted,
    how_it_ended,
    raise_if_interrupted,
    run_child,
    signals_deferred,
    spawn_context,
    stopped_on_leaving_early,
)
from fer_search.progress import FinalizeFn, FinalizePlan, SeedEpoch, percent
from fer_search.report import write_reports
from fer_search.results import (
    REPORTED_BASELINE,
    Aggregate,
    BestTrial,
    Candidate,
    Commands,
    DataRecord,
    Ensemble,
    Finalized,
    FinalMetrics,
    FlipChoice,
    Protocol,
    Scored,
    SeedFigures,
    SeedRun,
    Selection,
    Shipped,
    aggregate,
)
from fer_search.space import params_from_trial
from fer_search.storage import load_existing_study
from fer_search.study import provenance
from fer_search.tables import summary_text
from fer_search.train import (
    TrainSettings,
    configure_cpu_threads,
    field_of,
    logits_for,
    of_type,
    resolve_device,
    train_model,
)

# The resume files' format, part of their key: files from before model.pt stored float16 weights
# hold float32 ones, whose test metrics are not those of the weights finalize would ship; evaluated
# files from before flip averaging and ensembles hold no logits.
STORED_WEIGHTS = "compact_state"
EVALUATION = "logits/1"
RESUME_FILE = "resume file"  # how a resume file's errors name it
SPLITS = ("val", "val_mirrored", "test", "test_mirrored")  # SeedLogits' fields, as the evaluated file keeps them

Say = FinalizeFn  # finalize's notes (str) and progress events, to the CLI's display or a child's queue
T = TypeVar("T")


@dataclass(frozen=True)
class SeedJob:
    """One retraining: a configuration at one seed. `kind` names it: "best", "baseline", or "trial N" for a
    candidate of the re-ranking."""

    kind: str
    params: TrialParams
    seed: int

    @property
    def label(self) -> str:
        return f"{self.kind} seed {self.seed}"


@dataclass(frozen=True)
class SeedLogits:
    """One seed's float32 CPU logits on validation and test, of the faces and of their mirror images: every
    figure of flip averaging and of the ensemble is computed from them, by predict's formula (combined_logits)."""

    val: torch.Tensor
    val_mirrored: torch.Tensor
    test: torch.Tensor
    test_mirrored: torch.Tensor


@dataclass(frozen=True)
class SeedModel:
    """A retrained, evaluated seed: its run (single-model figures), its weights as model.pt stores them, its logits."""

    run: SeedRun
    state: dict[str, torch.Tensor]
    logits: SeedLogits


def finalize_study(config: Config, command: str, say: Say) -> str:
    """Re-rank the top trials, retrain the chosen one and the baseline, evaluate on PrivateTest (and the whole
    test folder), write the reports to config.final_dir.

    `command` is the command line of this finalize, recorded so that the report says how to reproduce it.
    """
    started = datetime.now().astimezone()  # the report says how long finalize took
    study = load_existing_study(config.study.storage, config.study.name)
    candidates = top_trials(study, config.finalize.top_k)
    device = resolve_device(config.run.device)
    # Checked before any data is decoded or seed trained: a bad --out must not cost a training run.
    out = made_folder(config.final_dir, "output")
    runs_dir = made_folder(resume_dir(config), "resume")
    seeds = [config.run.seed + i for i in range(config.finalize.seeds)]
    ensemble = config.finalize.ensemble and len(seeds) > 1
    if config.finalize.ensemble and not ensemble:
        say("--ensemble with one seed: that seed is shipped alone")
    if ensemble:
        check_ensemble_fits(candidates, len(seeds))
    searched_on = study.user_attrs.get("data_path")
    if not config.data.path.exists() and searched_on and Path(searched_on).exists():
        raise UserError(
            f"{config.data.path}: no such file or folder; study {study.study_name!r} was searched on "
            f"{searched_on}: pass --data {searched_on}"
        )
    # Train and val come from the search's cache in seconds; the test split is decoded only once the
    # configuration is chosen, by the final evaluation, and never before.
    train_val = load_configured(config.data)
    check_same_data(study, train_val, config.data.path)
    epochs = config.finalize.epochs or int(study.user_attrs.get("epochs", config.run.epochs))
    best, selection = rerank(candidates, config, train_val, epochs, device, runs_dir, say)
    if best.params == BASELINE and config.finalize.baseline:
        say("the best trial is the baseline: each seed is trained once and reported for both")
    data = load_configured(config.data, with_test=True)
    jobs = seed_jobs(best.params, seeds, config.finalize.baseline)
    models = dict(zip(jobs, retrain(jobs, config, data, epochs, device, runs_dir, say)))
    best_models = [models[SeedJob("best", best.params, seed)] for seed in seeds]
    baseline_models = baseline_models_of(models, best.params, seeds) if config.finalize.baseline else []
    # Each seed alone, without and with flip averaging, and the seeds together: scored once, from their logits.
    singles = {flip: scored_aggregate(best_models, flip, data) for flip in (False, True)}
    ensembled = ensemble_of(best_models, data) if len(seeds) > 1 else None
    flip = flip_choice(config.finalize.flip, singles, ensembled if ensemble else None)
    shipped_models = best_models if ensemble else [best_single(best_models, singles[flip.used])]
    shipped_scored, shipped_probs = scored(_logits(shipped_models), flip.used, data)
    shipped_seeds = [m.run.seed for m in shipped_models]
    meta = {
        "study": study.study_name,
        "trial": best.number,
        "seeds": shipped_seeds,
        "best_epochs": [m.run.best_epoch for m in shipped_models],
        "fingerprints": data.fingerprints,
    }
    save_model(out / "model.pt", [m.state for m in shipped_models], best.params, CLASSES, meta, flip=flip.used)
    metrics = FinalMetrics(
        shipped=Shipped(
            trial=best.number,
            seeds=shipped_seeds,
            flip=flip.used,
            ensemble=ensemble,
            val_acc=shipped_scored.val_acc,
            private_test=shipped_scored.private_test,
            test_all=shipped_scored.test_all,
        ),
        epochs=epochs,
        seeds=seeds,
        best_trial=best,
        selection=selection,
        flip=flip,
        best=singles[False],
        best_flipped=singles[True],
        ensemble=ensembled,
        baseline=scored_aggregate(baseline_models, False, data) if baseline_models else None,
        baseline_flipped=scored_aggregate(baseline_models, True, data) if baseline_models else None,
        baseline_reported=REPORTED_BASELINE,
        protocol=Protocol.of(data.val_is_public_test),
        data=DataRecord(str(config.data.path), data.fingerprints),
        commands=Commands(run=study.user_attrs.get("command"), finalize=command),
        **provenance(),
    )
    write_file(out / "metrics.json", metrics.to_json().encode())
    # The per-run figures show the shipped model's predictions, with the curves of its seed (an
    # ensemble's: its member of best validation accuracy) beside the baseline's run of that seed.
    shown = best_single(shipped_models, singles[flip.used]).run
    shipped_run = dataclasses.replace(
        shown,
        private_test=shipped_scored.private_test,
        test_all=shipped_scored.test_all,
        test_pred=shipped_probs.argmax(1).tolist(),
        test_conf=shipped_probs.max(1).values.tolist(),
    )
    baseline_same_seed = next((m.run for m in baseline_models if m.run.seed == shown.seed), None)
    test = _test_split(data)
    finalized = Finalized(
        metrics, shipped_run, baseline_same_seed, test.x[:, 0].numpy(), test.y.numpy(), CLASSES, study
    )
    written = write_reports(out, finalized, finalize_started=started)
    attach_final_files(study, config.study.artifacts, out)  # for optuna-dashboard; a failure only warns
    return summary_text(metrics, out, [out / "model.pt", out / "metrics.json", *written])


def resume_dir(config: Config) -> Path:
    """Finished seeds of an interrupted finalize: kept with the study, not in the folder users take away."""
    return config.study.dir / config.study.name / "finalize-runs"


def top_trials(study: optuna.Study, k: int) -> list[BestTrial]:
    """The k best complete trials by search score, best first (ties: the earlier trial), one per configuration:
    a configuration scored twice is one candidate, at its best score."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise UserError(f"study {study.study_name!r} has no complete trial yet: run `fer-search run` first")
    ranked = sorted(complete, key=lambda t: (-t.values[0], t.number))
    found: list[BestTrial] = []
    for trial in ranked:
        params = params_from_trial(trial.user_attrs)
        if all(c.params != params for c in found):
            found.append(BestTrial(trial.number, trial.values[0], params))
        if len(found) == k:
            break
    return found


def check_ensemble_fits(candidates: list[BestTrial], seeds: int) -> None:
    """--ensemble is refused before any training where the model file of any candidate's seeds would be too big."""
    for c in candidates:
        per_model = stored_bytes(c.params)
        size = seeds * per_model
        if seeds > MAX_MEMBERS:
            problem = f"{seeds} members, over the {MAX_MEMBERS} a model file may hold"
        elif size > MODEL_FILE_LIMIT:
            problem = f"about {size / 2**20:.1f} MiB, over the {MODEL_FILE_LIMIT // 2**20} MiB a model file may take"
        else:
            continue
        fit = min(MAX_MEMBERS, MODEL_FILE_LIMIT // per_model)
        advice = f"pass --seeds {fit} or fewer, or" if fit >= 2 else "its model is too big to ensemble:"
        raise UserError(
            f"--ensemble: {seeds} seeds of trial #{c.number} would make model.pt {problem}; "
            f"{advice} leave --ensemble out"
        )


def rerank(
    candidates: list[BestTrial],
    config: Config,
    data: FerData,
    epochs: int,
    device: torch.device,
    runs_dir: Path,
    say: Say,
) -> tuple[BestTrial, Selection | None]:
    """The candidate with the best mean validation accuracy over finalize.selection_seeds retrainings, and the
    re-ranking's record; the search's best as it is where there is one candidate (--top-k 1).

    Why: the search's best score is the maximum of many noisy ones, so it overstates its trial and the
    runner-up is often as good; fresh retrainings are not selected on, so their mean is not biased that way.
    Only the validation split is used: `data` holds no test split."""
    if len(candidates) < 2:
        return candidates[0], None
    seeds = [config.run.seed + i for i in range(config.finalize.selection_seeds)]
    numbers = ", ".join(f"#{c.number}" for c in candidates)
    say(f"re-ranking trials {numbers}: each retrained with seeds {seeds_list(seeds)}")
    jobs = [SeedJob(f"trial {c.number}", c.params, seed) for c in candidates for seed in seeds]
    accs = dict(zip(jobs, retrain(jobs, config, data, epochs, device, runs_dir, say)))
    ranked = [
        candidate_of(c, {seed: accs[SeedJob(f"trial {c.number}", c.params, seed)] for seed in seeds})
        for c in candidates
    ]
    chosen = max(ranked, key=lambda c: (c.mean, c.value, -c.number))
    best = next(c for c in candidates if c.number == chosen.number)
    say(
        f"re-ranked: trial #{chosen.number} is finalized, retrained {percent(chosen.mean)} on average over seeds "
        f"{seeds_list(seeds)} against {percent(chosen.value)} in the search"
    )
    return best, Selection(
        top_k=config.finalize.top_k,
        seeds=seeds,
        candidates=ranked,
        chosen=chosen.number,
        overstated_by=chosen.value - chosen.mean,
    )


def candidate_of(trial: BestTrial, val_accs: dict[int, float]) -> Candidate:
    values = list(val_accs.values())
    return Candidate(
        number=trial.number,
        value=trial.value,
        params=trial.params,
        val_accs={str(seed): acc for seed, acc in val_accs.items()},
        mean=float(np.mean(values)),
        std=float(np.std(values, ddof=1)) if len(values) > 1 else None,
    )


def _test_split(data: FerData) -> SplitData:
    """The test split, which the final evaluation loads (with_test=True)."""
    assert data.test is not None
    return data.test


def check_same_data(study: optuna.Study, data: FerData, path: Path) -> None:
    """The retrained model must see the data its trial was searched on."""
    stored = study.user_attrs.get("fingerprints", {})
    changed = [s for s in ("train", "val") if stored.get(s) != data.fingerprints[s]]
    if changed:
        raise UserError(
            f"data at {path} differs from the data study {study.study_name!r} was searched on "
            f"({', '.join(changed)} split fingerprint); pass the study's data with --data"
        )


def seed_jobs(best: TrialParams, seeds: list[int], baseline: bool) -> list[SeedJob]:
    """The retrainings: the best trial's seeds, then the baseline's, unless the best trial is the baseline
    (trial 0 won), whose seeds then serve both."""
    jobs = [SeedJob("best", best, seed) for seed in seeds]
    if baseline and best != BASELINE:
        jobs += [SeedJob("baseline", BASELINE, seed) for seed in seeds]
    return jobs


def baseline_models_of(models: dict[SeedJob, SeedModel], best: TrialParams, seeds: list[int]) -> list[SeedModel]:
    """The baseline's seeds: its own, or the best trial's relabelled where the best trial is the baseline."""
    if best != BASELINE:
        return [models[SeedJob("baseline", BASELINE, seed)] for seed in seeds]
    copies = (models[SeedJob("best", best, seed)] for seed in seeds)
    return [dataclasses.replace(m, run=dataclasses.replace(m.run, kind="baseline")) for m in copies]


# --- what the seeds' logits score: flip averaging, the ensemble, the shipped model ----------


def scored(logits: list[SeedLogits], flip: bool, data: FerData) -> tuple[Scored, torch.Tensor]:
    """The figures of the seeds of `logits` predicting together (one: alone), with or without flip averaging,
    and their probabilities on the test split: exactly what predict computes from a model file of them."""
    val_probs, test_probs = (_probabilities_of(logits, split, flip) for split in ("val", "test"))
    test = _test_split(data)
    val_pred, test_pred = val_probs.argmax(1), test_probs.argmax(1)
    all_pred, all_y = test_pred, test.y
    if data.val_is_public_test:  # Public + Private
        all_pred, all_y = torch.cat([val_pred, test_pred]), torch.cat([data.val.y, test.y])
    figures = Scored(
        val_acc=(val_pred == data.val.y).double().mean().item(),
        private_test=classification_report(test.y.numpy(), test_pred.numpy(), CLASSES),
        test_all=classification_report(all_y.numpy(), all_pred.numpy(), CLASSES),
    )
    return figures, test_probs


def _probabilities_of(logits: list[SeedLogits], split: str, flip: bool) -> torch.Tensor:
    plain = [getattr(seed, split) for seed in logits]
    mirror = [getattr(seed, f"{split}_mirrored") for seed in logits] if flip else None
    return torch.softmax(combined_logits(plain, mirror), dim=1)


def _logits(models: list[SeedModel]) -> list[SeedLogits]:
    return [m.logits for m in models]


def best_single(models: list[SeedModel], singles: Aggregate) -> SeedModel:
    """The seed of best validation accuracy as it predicts alone, scored as in `singles` (ties: the lower seed)."""
    return max(models, key=lambda m: (singles.per_seed[str(m.run.seed)].val_acc, -m.run.seed))


def flip_choice(mode: str, singles: dict[bool, Aggregate], ensembled: Ensemble | None) -> FlipChoice:
    """Whether the shipped model averages each face with its mirror image: as finalize.flip's `mode` says, or
    under auto where it scores higher on validation, for what is shipped: the ensemble where `ensembled` is
    given, else the seeds alone on average (`singles`, by whether they flip)."""
    if ensembled is not None:
        decided_on = f"the ensemble of seeds {seeds_list(ensembled.seeds)}"
        plain, flipped = ensembled.plain.val_acc, ensembled.flipped.val_acc
    else:
        decided_on = f"the mean of seeds {seeds_list(singles[False].per_seed)}"
        plain, flipped = (
            float(np.mean([f.val_acc for f in singles[flip].per_seed.values()])) for flip in (False, True)
        )
    used = mode == "on" or (mode == "auto" and flipped > plain)
    return FlipChoice(mode=mode, used=used, decided_on=decided_on, val_acc=plain, val_acc_flipped=flipped)


def scored_aggregate(models: list[SeedModel], flip: bool, data: FerData) -> Aggregate:
    """The seeds as single models, flip averaged or not, each with its validation accuracy as it predicts so
    (float32 on the CPU, rounded weights: the figure flip_choice and best_single compare)."""
    per_seed = {}
    for m in models:
        figures = scored([m.logits], flip, data)[0]
        per_seed[str(m.run.seed)] = SeedFigures(
            figures.val_acc, m.run.best_epoch, figures.private_test, figures.test_all
        )
    return aggregate(per_seed)


def ensemble_of(models: list[SeedModel], data: FerData) -> Ensemble:
    return Ensemble(
        seeds=[m.run.seed for m in models],
        plain=scored(_logits(models), False, data)[0],
        flipped=scored(_logits(models), True, data)[0],
    )


# --- the retrainings and their resume files -------------------------------------------------


def retrain(
    jobs: list[SeedJob], config: Config, data: FerData, epochs: int, device: torch.device, runs_dir: Path, say: Say
) -> list[Any]:
    """Each job's result, in order: with a test split in `data`, its SeedModel (trained and evaluated);
    without one, its best validation accuracy (trained only: the re-ranking). Reused from earlier finalizes
    where their resume files fit, else done here (finalize.jobs = 1) or in finalize.jobs processes at once."""
    evaluate = data.test is not None

    def finished(job: SeedJob) -> Any:
        return (_evaluated_model if evaluate else _selection_val_acc)(job, epochs, data.fingerprints, runs_dir, say)

    found: dict[SeedJob, Any] = {}
    for job in jobs:
        result = finished(job)
        if result is not None:
            say(f"{job.label}: reusing its finished run in {runs_dir}")
            found[job] = result
    todo = [job for job in jobs if job not in found]
    untrained = [job for job in todo if not trained_file(runs_dir, job, epochs, data.fingerprints)[0].is_file()]
    say(FinalizePlan(len(untrained) * epochs))
    if config.finalize.jobs == 1:
        configure_cpu_threads(1)
        for job in todo:
            doc = trained_doc(job, epochs, data, device, runs_dir, say)
            found[job] = seed_model(job, doc, epochs, data, runs_dir) if evaluate else doc["val_acc"]
    elif todo:
        train_in_processes(todo, config, epochs, runs_dir, say, evaluate)
        for job in todo:  # each process left its run in its resume file
            result = finished(job)
            if result is None:
                raise Crashed(f"{job.label}: its process ended without writing its resume file in {runs_dir}")
            found[job] = result
    return [found[job] for job in jobs]


def trained_file(
    runs_dir: Path, job: SeedJob, epochs: int, fingerprints: dict[str, str]
) -> tuple[Path, dict[str, Any]]:
    """Where a job's training is kept, and the key that file must hold to be reused: it depends on the
    configuration, seed, epochs and the train and val splits, not on the job's role (a candidate's run is
    the finalized trial's if it wins)."""
    key = {
        "params": job.params.to_dict(),
        "seed": job.seed,
        "epochs": epochs,
        "fingerprints": {s: fingerprints[s] for s in ("train", "val")},
        "weights": STORED_WEIGHTS,
    }
    # Named by its key too: the folder is the study's, shared by finalizes with other --epochs or --out.
    return runs_dir / f"seed{job.seed}-{sha256_json(key)[:16]}.pt", key


def evaluated_file(
    runs_dir: Path, job: SeedJob, epochs: int, fingerprints: dict[str, str], trained_id: str
) -> tuple[Path, dict[str, Any]]:
    """Where a trained job's evaluation is kept, and its key: the training's, the test split's, and the id of
    the training it evaluated, so that the evaluation of an earlier training of the same key is not reused."""
    path, key = trained_file(runs_dir, job, epochs, fingerprints)
    key = {**key, "test": fingerprints["test"], "evaluation": EVALUATION}
    return path.with_name(f"seed{job.seed}-{sha256_json(key)[:16]}.eval.pt"), {**key, "trained": trained_id}


def trained_doc(
    job: SeedJob, epochs: int, data: FerData, device: torch.device, runs_dir: Path, say: Say
) -> dict[str, Any]:
    """The job's training (weights as model.pt stores them, best epoch, validation accuracy, history): from
    its resume file, or trained now and kept there."""
    path, key = trained_file(runs_dir, job, epochs, data.fingerprints)
    doc = _load_doc(path, key, job, say, _trained_fields)
    if doc is None:
        doc = _trained_seed(job, epochs, data, device, say)
        _save_doc(path, {"key": key, **doc})
    else:
        say(f"{job.label}: trained earlier (by the re-ranking or an interrupted finalize); evaluating it")
    return doc


def seed_model(job: SeedJob, trained: dict[str, Any], epochs: int, data: FerData, runs_dir: Path) -> SeedModel:
    """Evaluate a trained seed on validation and the test splits, and keep the evaluation in its resume file.

    Kept apart from the training: the float32 CPU pass can take as long as a GPU training, and an
    interruption there must not cost the training."""
    run, logits = _evaluated(job, trained, data)
    path, key = evaluated_file(runs_dir, job, epochs, data.fingerprints, trained["id"])
    logit_doc = {name: getattr(logits, name) for name in SPLITS}
    _save_doc(path, {"key": key, "run": run.to_json(), "logits": logit_doc})
    return SeedModel(run, trained["state"], logits)


def _selection_val_acc(
    job: SeedJob, epochs: int, fingerprints: dict[str, str], runs_dir: Path, say: Say
) -> float | None:
    """A re-ranking run's best validation accuracy, from its training's resume file; None where there is none."""
    path, key = trained_file(runs_dir, job, epochs, fingerprints)
    doc = _load_doc(path, key, job, say, _trained_fields)
    return None if doc is None else float(doc["val_acc"])


def _evaluated_model(
    job: SeedJob, epochs: int, fingerprints: dict[str, str], runs_dir: Path, say: Say
) -> SeedModel | None:
    """A trained and evaluated seed from its two resume files; None where either is missing or unusable."""
    if not evaluated_file(runs_dir, job, epochs, fingerprints, "")[0].is_file():  # its name holds no training id
        return None  # not evaluated yet: its training is loaded once, by trained_doc
    trained = _load_doc(*trained_file(runs_dir, job, epochs, fingerprints), job, say, _trained_fields)
    if trained is None:
        return None
    evaluated = _load_doc(*evaluated_file(runs_dir, job, epochs, fingerprints, trained["id"]), job, say, _evaluation)
    if evaluated is None:
        return None
    run, logits = evaluated
    return SeedModel(dataclasses.replace(run, kind=job.kind), trained["state"], logits)


def _trained_seed(job: SeedJob, epochs: int, data: FerData, device: torch.device, say: Say) -> dict[str, Any]:
    """The seed's weights as model.pt stores them (rounded), its best epoch, validation accuracy and history."""

    def on_epoch(record: Any, _checkpoint: Any) -> None:
        say(SeedEpoch(job.label, record.epoch, epochs, record.val_acc))

    result = train_model(
        job.params, data, TrainSettings(epochs=epochs, seed=job.seed, device=device), on_epoch=on_epoch
    )
    return {
        "id": uuid.uuid4().hex,  # names this training in its evaluation's key
        "state": compact_state(result.best_state),
        "best_epoch": result.best_epoch,
        "val_acc": result.best_val_acc,
        "history": json.dumps([dataclasses.asdict(r) for r in result.history]),
    }


def _evaluated(job: SeedJob, trained: dict[str, Any], data: FerData) -> tuple[SeedRun, SeedLogits]:
    """The trained seed's logits on validation and test, faces and mirror images, as predict computes them
    (float32 on the CPU, on exactly the rounded weights), and its single-model figures."""
    model = model_from_state(job.params, trained["state"], len(CLASSES))
    test = _test_split(data)
    logits = SeedLogits(
        val=logits_for(model, data.val.x.cpu()),
        val_mirrored=logits_for(model, data.val.x.cpu().flip(-1)),
        test=logits_for(model, test.x.cpu()),
        test_mirrored=logits_for(model, test.x.cpu().flip(-1)),
    )
    figures, probs = scored([logits], False, data)
    run = SeedRun(
        kind=job.kind,
        seed=job.seed,
        best_epoch=trained["best_epoch"],
        val_acc=trained["val_acc"],
        history=json.loads(trained["history"]),
        private_test=figures.private_test,
        test_all=figures.test_all,
        test_pred=probs.argmax(1).tolist(),
        test_conf=probs.max(1).values.tolist(),
    )
    return run, logits


def _save_doc(path: Path, doc: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(doc, buffer)
    write_file(path, buffer.getvalue())


def _load_doc(
    path: Path, key: dict[str, Any], job: SeedJob, say: Say, read: Callable[[dict[str, Any], SeedJob], T]
) -> T | None:
    """What `read` takes from `job`'s resume file; None where there is none or it is unusable (said), to retrain it."""
    if not path.is_file():
        return None
    try:
        doc = of_type(torch.load(path, map_location="cpu", weights_only=True), dict, RESUME_FILE)
        if doc.get("key") != key:
            raise ValueError("written for another run")
        return read(doc, job)
    except Exception as e:  # damaged, foreign or misfit: retrained, never fatal
        again = "evaluating" if path.name.endswith(".eval.pt") else "training"
        say(f"{job.label}: cannot reuse {path} ({type(e).__name__}: {first_line(e)}); {again} it again")
        return None


def _evaluation(doc: dict[str, Any], job: SeedJob) -> tuple[SeedRun, SeedLogits]:
    """The run and logits of an evaluated resume file; raises where they are not `job`'s or not logits."""
    run = SeedRun.from_json(field_of(doc, "run", str, RESUME_FILE))
    if run.seed != job.seed:
        raise ValueError(f"it holds the run of seed {run.seed}")
    logits: dict[str, Any] = field_of(doc, "logits", dict, RESUME_FILE)
    for name in SPLITS:
        tensor = logits.get(name)
        if not (isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32 and tensor.dim() == 2):
            raise ValueError(f"its {name} logits are no float32 matrix")
        if tensor.shape != logits[name.removesuffix("_mirrored")].shape or tensor.shape[1] != len(CLASSES):
            raise ValueError(f"its {name} logits have the shape {tuple(tensor.shape)}")
    return run, SeedLogits(**{name: logits[name] for name in SPLITS})


def _trained_fields(doc: dict[str, Any], job: SeedJob) -> dict[str, Any]:
    """A trained resume file's fields, as the evaluation and re-ranking take them; raises where they do not fit."""
    field_of(doc, "id", str, RESUME_FILE)
    field_of(doc, "best_epoch", int, RESUME_FILE)
    field_of(doc, "val_acc", float, RESUME_FILE)
    if not isinstance(json.loads(field_of(doc, "history", str, RESUME_FILE)), list):
        raise ValueError("its history is no list of epochs")
    _fitting_state(doc, job)
    return doc


def _fitting_state(doc: dict[str, Any], job: SeedJob) -> dict[str, torch.Tensor]:
    """A resume file's weights, where they load into `job`'s model as the evaluation and model.pt load them."""
    state: dict[str, torch.Tensor] = field_of(doc, "state", dict, RESUME_FILE)
    model_from_state(job.params, state, len(CLASSES))
    return state


# --- finalize.jobs > 1: seed runs in processes of their own ---------------------------------


def train_in_processes(
    jobs: list[SeedJob], config: Config, epochs: int, runs_dir: Path, say: Say, evaluate: bool
) -> None:
    """Train `jobs` in config.finalize.jobs processes at once, sharing the device; each writes its resume
    file, and with `evaluate` evaluates its training on the test splits too (the re-ranking's do not).

    Their progress lines come to `say`. A user error in one becomes a UserError here, a crash a
    Crashed, after the others are stopped; Ctrl-C or SIGTERM stops them all, and finished seeds stay
    in their resume files.
    """
    ctx = spawn_context()
    queue = ctx.SimpleQueue()
    waiting = list(jobs)
    running: dict[SeedJob, Any] = {}
    failures: dict[str, str] = {}
    with stopped_on_leaving_early(running.values(), lambda: _drain(queue, say, {})):
        while waiting or running:
            while waiting and len(running) < config.finalize.jobs:
                job = waiting.pop(0)
                process = ctx.Process(
                    target=_seed_process, args=(config, job, epochs, runs_dir, queue, evaluate), name=job.label
                )
                with signals_deferred():  # it imports torch with Ctrl-C held back, until run_child
                    process.start()
                    running[job] = process
            ended = [job for job, p in running.items() if not p.is_alive()]
            _drain(queue, say, failures)  # after is_alive: an ended process's messages are all in the pipe by now
            for job in ended:
                code = running.pop(job).exitcode
                interrupted = ended_interrupted([code])
                if interrupted is not None:
                    raise interrupted
                if code == USER_ERROR:
                    raise UserError(f"{job.label}: {failures.get(job.label, 'failed')}")
                if code != 0:
                    reason = failures.get(job.label)
                    told = f"{reason} (its traceback is above)" if reason else f"its process {how_it_ended(code)}"
                    raise Crashed(f"{job.label}: {told}")
            raise_if_interrupted()
            time.sleep(0.1)


def _drain(queue: Any, say: Say, failures: dict[str, str]) -> None:
    while not queue.empty():
        message = queue.get()
        if isinstance(message, ChildError):
            failures[message.label] = message.message
        else:
            say(message)


def _seed_process(config: Config, job: SeedJob, epochs: int, runs_dir: Path, queue: Any, evaluate: bool) -> None:
    """Entry point of one seed run's process; exit codes follow the CLI's (2 bad input, 130 Ctrl-C, 143 SIGTERM)."""

    def work() -> None:
        configure_cpu_threads(config.finalize.jobs)  # the cores are shared among the processes
        # From the cache the parent has warmed; the test split only for the final evaluation, never for re-ranking.
        data = load_configured(config.data, with_test=evaluate)
        doc = trained_doc(job, epochs, data, resolve_device(config.run.device), runs_dir, queue.put)
        if evaluate:
            seed_model(job, doc, epochs, data, runs_dir)

    run_child(job.label, queue, work)
