"""finalize: retrain best + baseline over seeds, evaluate on the test set, write every report file."""

from __future__ import annotations

import dataclasses
import errno
import html
import json
import multiprocessing.process
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import torch
from click.testing import CliRunner, Result
from finalizing import REPORT_FILES
from searching import live_in_session
from test_processes import swallowed_interrupt
from test_results import METRICS_KEYS

from fer_search.cli import main
from fer_search.config import load_config
from fer_search.data import CLASSES
from fer_search.errors import Crashed, UserError
from fer_search.finalize import SeedJob, evaluated_file, train_in_processes, trained_file
from fer_search.metrics import ClassificationReport, classification_report
from fer_search.model import BASELINE, TrialParams
from fer_search.predict import load_model, model_from_state, predict_images
from fer_search.processes import Terminated, signals_interrupt
from fer_search.progress import SeedEpoch
from fer_search.results import FinalMetrics, SeedRun

REPO = Path(__file__).resolve().parents[1]

FILES = ("model.pt", "metrics.json", *REPORT_FILES)


def final_dir(folder: Path) -> Path:
    return folder / "studies" / "fer2013" / "final"


def resume_dir(folder: Path) -> Path:
    return folder / "studies" / "fer2013" / "finalize-runs"


def finalize(folder: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["finalize", "--config", str(folder / "search.toml"), *args])


def searched(folder: Path, tiny_fer: Path, toml: str = "") -> Path:
    """`folder` with a search.toml (the tiny data, then `toml`) and its study: one trial of one epoch.

    With the default space that trial is trial 0, the baseline."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "search.toml").write_text(f'[data]\npath = "{tiny_fer}"\n{toml}')
    result = CliRunner().invoke(
        main, ["run", "--trials", "1", "--epochs", "1", "--config", str(folder / "search.toml"), "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    return folder


def best_is_baseline(folder: Path) -> bool:
    """Whether trial 0 won the study (the samplers are seeded with the host name): its seeds then train once."""
    return metrics_of(final_dir(folder)).best_trial.params == BASELINE


def metrics_of(out: Path) -> FinalMetrics:
    return FinalMetrics.from_json((out / "metrics.json").read_text())


def seed_files(folder: Path, kind: str, seed: int) -> tuple[Path, Path]:
    """The resume files (training, evaluation) of the folder's finalized trial ("best") or baseline at `seed`."""
    m = metrics_of(final_dir(folder))
    job = SeedJob(kind, m.best_trial.params if kind == "best" else BASELINE, seed)
    trained, _ = trained_file(resume_dir(folder), job, m.epochs, m.data.fingerprints)
    return trained, evaluated_file(resume_dir(folder), job, m.epochs, m.data.fingerprints, "")[0]


def best_seed_label(m: FinalMetrics, seed: int) -> str:
    """The label under which the finalized trial's seed is trained: by the re-ranking where it retrained it."""
    if m.selection is not None and seed in m.selection.seeds:
        return f"trial {m.best_trial.number} seed {seed}"
    return f"best seed {seed}"


def trained(result: Result) -> list[str]:
    """The seed runs a finalize trained, one entry per epoch line."""
    lines = [line.split("fer_search: ", 1)[-1] for line in result.stderr.splitlines()]  # past the log line's time
    return [line.split(": epoch")[0] for line in lines if ": epoch " in line]


def one_line_error(result: Result) -> str:
    """The error of a run that must end with exit 2 and a single line on stderr, no traceback."""
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == "", result.output
    return result.stderr


def test_writes_every_file_and_nothing_else(finalized: Path) -> None:
    out = final_dir(finalized)
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)  # the resume files live with the study
    for name in FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_json_is_its_record_with_every_key_in_order(finalized: Path) -> None:
    text = (final_dir(finalized) / "metrics.json").read_text()
    assert list(json.loads(text)) == METRICS_KEYS
    assert FinalMetrics.from_json(text).to_json() == text  # read and written back byte for byte


def test_metrics_hold_best_and_baseline_per_seed_and_aggregated(finalized: Path) -> None:
    m = metrics_of(final_dir(finalized))
    study = optuna.load_study(study_name="fer2013", storage=f"sqlite:///{finalized}/studies/fer2013.db")
    assert m.selection is not None and m.selection.seeds == [0, 1]  # 3 trials: re-ranked by default
    assert [c.number for c in m.selection.candidates][0] == study.best_trial.number
    chosen = next(c for c in m.selection.candidates if c.number == m.selection.chosen)
    assert (m.best_trial.number, m.best_trial.value) == (chosen.number, chosen.value)
    assert m.best_trial.params == chosen.params
    assert chosen.mean == max(c.mean for c in m.selection.candidates)
    assert m.best_trial.value == study.trials[m.best_trial.number].value
    assert m.seeds == [0, 1] and len(m.shipped.seeds) == 1 and m.epochs == 2
    for agg in (m.best, m.baseline, m.best_flipped, m.baseline_flipped):
        assert agg is not None and agg.std is not None and set(agg.per_seed) == {"0", "1"}
        for run in agg.per_seed.values():
            assert run.private_test.n == 28 and run.test_all.n == 56  # 4 + 4 per class, 7 classes
            assert set(run.private_test.per_class) == set(CLASSES)
            assert len(run.private_test.confusion) == 7
        accs = [r.private_test.accuracy for r in agg.per_seed.values()]
        assert agg.mean.private_test.accuracy == pytest.approx(sum(accs) / 2)
        assert agg.std.private_test.accuracy == pytest.approx(abs(accs[0] - accs[1]) / 2**0.5)
        confusions = np.array([r.private_test.confusion for r in agg.per_seed.values()])
        assert np.allclose(agg.mean.private_test.confusion, confusions.mean(axis=0))
        assert np.allclose(
            agg.std.test_all.confusion,
            np.array([r.test_all.confusion for r in agg.per_seed.values()]).std(axis=0, ddof=1),
        )
    [seed] = m.shipped.seeds
    assert m.shipped.trial == m.best_trial.number and not m.shipped.ensemble
    assert m.shipped.flip == m.flip.used and m.flip.mode == "auto"
    assert m.flip.used == (m.flip.val_acc_flipped > m.flip.val_acc)  # decided on validation
    flipped, plain = m.best_flipped.per_seed, m.best.per_seed
    assert m.flip.val_acc_flipped == pytest.approx(np.mean([f.val_acc for f in flipped.values()]))
    assert m.flip.val_acc == pytest.approx(np.mean([f.val_acc for f in plain.values()]))
    shipped_as = flipped if m.flip.used else plain  # the shipped seed is the best on validation, as it predicts
    assert m.shipped.val_acc == max(f.val_acc for f in shipped_as.values()) == shipped_as[str(seed)].val_acc
    assert m.ensemble is not None and m.ensemble.seeds == [0, 1]


def test_predict_reproduces_the_shipped_private_test_accuracy(finalized: Path, tiny_fer: Path) -> None:
    """An honest cross-check: predict, run as a user would, scores exactly what metrics.json says."""
    m = metrics_of(final_dir(finalized))
    images = sorted(tiny_fer.glob("test/*/PrivateTest_*.jpg"))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "fer_search",
            "predict",
            "--config",
            str(finalized / "search.toml"),
            "--json",
            *map(str, images),
        ],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == len(images)
    truth = [CLASSES.index(Path(line["path"]).parent.name) for line in lines]
    assert predicted_report(truth, [CLASSES.index(line["label"]) for line in lines]) == m.shipped.private_test
    single = m.best_flipped if m.shipped.flip else m.best
    [seed] = m.shipped.seeds
    assert m.shipped.private_test == single.per_seed[str(seed)].private_test


def predicted_report(truth: list[int], predicted: list[int]) -> ClassificationReport:
    """The classification report of `predicted`: the same confusion, not only as many right."""
    return classification_report(np.array(truth), np.array(predicted), CLASSES)


def test_metrics_and_page_give_the_commands(finalized: Path) -> None:
    commands = metrics_of(final_dir(finalized)).commands
    assert commands.finalize.startswith(
        shlex.join(["fer-search", "finalize", "--config", str(finalized / "search.toml"), "--seeds", "2"])
    )
    page = (final_dir(finalized) / "report.html").read_text()
    assert html.escape(commands.finalize, quote=True) in page
    assert commands.run is not None and commands.run.startswith("fer-search run --trials 3 ")  # recorded by `run`
    assert html.escape(commands.run, quote=True) in page


def test_the_finalize_command_hides_a_storage_password(finalized: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fer_search.finalize

    seen = []
    monkeypatch.setattr(
        fer_search.finalize, "finalize_study", lambda _config, command, _say: seen.append(command) or ""
    )
    result = finalize(finalized, "--storage", "postgresql://me:secret@db.example/fer", "--no-baseline")
    assert result.exit_code == 0, result.output
    assert seen == [
        shlex.join(
            [
                "fer-search",
                "finalize",
                "--storage",
                "postgresql://me:***@db.example/fer",
                "--config",
                str(finalized / "search.toml"),
                "--no-baseline",
            ]
        )
    ]


def test_rerun_reuses_finished_seeds(finalized: Path) -> None:
    before = metrics_of(final_dir(finalized))
    kinds = ("best",) if best_is_baseline(finalized) else ("best", "baseline")
    assert all(path.is_file() for kind in kinds for seed in (0, 1) for path in seed_files(finalized, kind, seed))
    result = finalize(finalized, "--seeds", "2")
    assert result.exit_code == 0
    assert trained(result) == [] and "evaluating it" not in result.stderr
    reranked = 0 if before.selection is None else len(before.selection.candidates) * 2
    assert result.stderr.count("reusing its finished run") == reranked + 2 * len(kinds)
    after = metrics_of(final_dir(finalized))
    assert (after.best, after.selection, after.shipped) == (before.best, before.selection, before.shipped)


def test_interrupted_finalize_retrains_only_the_unfinished_seed(finalized: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(finalized, tmp_path / "study"))  # the session's study stays as it is
    before = metrics_of(final_dir(folder))
    for path in seed_files(folder, "best", 1):  # interrupted while training the finalized trial's seed 1
        path.unlink()
    result = finalize(folder, "--seeds", "2")
    assert result.exit_code == 0, result.output
    assert set(trained(result)) == {best_seed_label(before, 1)}
    m = metrics_of(final_dir(folder))
    assert m.baseline is not None and set(m.best.per_seed) == set(m.baseline.per_seed) == {"0", "1"}
    assert m.best.std is not None and m.best_trial == before.best_trial
    assert all(path.is_file() for path in seed_files(folder, "best", 1))


def test_a_finalize_interrupted_while_evaluating_keeps_the_training(
    finalized: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fer_search.finalize as finalize_module

    folder = Path(shutil.copytree(finalized, tmp_path / "study"))
    training, evaluation = seed_files(folder, "best", 1)
    evaluation.unlink()
    evaluated = finalize_module._evaluated

    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt  # Ctrl-C during the CPU pass over the test splits

    monkeypatch.setattr(finalize_module, "_evaluated", interrupted)
    assert finalize(folder, "--seeds", "2").exit_code == 130
    assert training.is_file() and not evaluation.exists()
    monkeypatch.setattr(finalize_module, "_evaluated", evaluated)
    result = finalize(folder, "--seeds", "2")
    assert result.exit_code == 0, result.output
    assert trained(result) == [] and "best seed 1: trained earlier" in result.stderr
    assert evaluation.is_file()
    assert metrics_of(final_dir(folder)).best.per_seed == metrics_of(final_dir(finalized)).best.per_seed


def shrunk_first_weight(doc: dict[str, Any]) -> None:
    doc["state"][next(iter(doc["state"]))] = torch.zeros(3)


@pytest.mark.parametrize(
    "evaluation, change",
    [
        pytest.param(True, lambda doc: doc.update(run=json.loads(doc["run"])), id="evaluation, run not JSON text"),
        pytest.param(True, lambda doc: doc["logits"].update(test=torch.zeros(3, 7)), id="evaluation, logits cut"),
        pytest.param(True, lambda doc: doc["key"].update(trained="another"), id="evaluation of another training"),
        pytest.param(False, shrunk_first_weight, id="training, weights of another shape"),
        pytest.param(False, lambda doc: doc.update(history=json.loads(doc["history"])), id="training, history"),
    ],
)
def test_a_resume_file_that_does_not_fit_is_done_again(
    finalized: Path, tmp_path: Path, evaluation: bool, change: Callable[[dict[str, Any]], None]
) -> None:
    """A resume file under the right name and key whose contents finalize could not use: one line, then redone;
    a training done again is evaluated again, never paired with the old training's evaluation."""
    folder = Path(shutil.copytree(finalized, tmp_path / "study"))
    m = metrics_of(final_dir(folder))
    training, evaluated = seed_files(folder, "best", 1)
    path = evaluated if evaluation else training
    doc = torch.load(path, weights_only=True)
    change(doc)
    torch.save(doc, path)
    old_id = torch.load(training, weights_only=True).get("id")
    result = finalize(folder, "--seeds", "2")
    assert result.exit_code == 0, result.output
    assert f": cannot reuse {path} (" in result.stderr and "Traceback" not in result.output
    assert set(trained(result)) == (set() if evaluation else {best_seed_label(m, 1)})
    assert "best seed 1: trained earlier" in result.stderr  # evaluated again
    doc = torch.load(training, weights_only=True)
    model_from_state(m.best_trial.params, doc["state"], len(CLASSES))  # fits now
    assert torch.load(evaluated, weights_only=True)["key"]["trained"] == doc["id"]
    assert (doc["id"] == old_id) == evaluation


def test_no_baseline_top_k_1_and_out(finalized: Path, tmp_path: Path) -> None:
    # A copy: this finalize attaches its model.pt and report.html to the study, which other tests read.
    folder = Path(shutil.copytree(finalized, tmp_path / "study"))
    before = set(resume_dir(folder).iterdir())
    args = ("--seeds", "1", "--no-baseline", "--top-k", "1", "--out", str(tmp_path / "out"), "--epochs", "1")
    result = finalize(folder, *args)
    assert result.exit_code == 0, result.output
    m = metrics_of(tmp_path / "out")
    assert m.baseline is None and m.baseline_flipped is None and m.best.std is None and m.epochs == 1
    assert m.selection is None and m.ensemble is None  # the search's best, one seed
    study = optuna.load_study(study_name="fer2013", storage=f"sqlite:///{folder}/studies/fer2013.db")
    assert m.best_trial.number == study.best_trial.number
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(FILES)
    new = set(resume_dir(folder).iterdir()) - before  # --out moves the outputs, not the resume files
    assert sorted(p.name.split("-", 1)[0] for p in new) == ["seed0", "seed0"]  # its training and evaluation


def test_unusable_out_exits_2_before_any_training(finalized: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    error = one_line_error(finalize(finalized, "--out", str(blocker / "final")))
    assert str(blocker / "final") in error


def test_no_complete_trial_exits_2(tmp_path: Path, tiny_fer: Path) -> None:
    (tmp_path / "search.toml").write_text(f'[data]\npath = "{tiny_fer}"\n')
    storage = f"sqlite:///{tmp_path}/studies/fer2013.db"
    (tmp_path / "studies").mkdir()
    optuna.create_study(study_name="fer2013", storage=storage)
    assert "no complete trial" in one_line_error(finalize(tmp_path))


def test_changed_data_exits_2(finalized: Path, tmp_path: Path) -> None:
    from conftest import write_tiny_fer

    other = write_tiny_fer(tmp_path / "other", seed=1)
    error = one_line_error(finalize(finalized, "--data", str(other)))
    assert "differs from the data" in error and "train" in error


def test_a_missing_data_path_names_the_one_the_study_was_searched_on(
    finalized: Path, tiny_fer: Path, tmp_path: Path
) -> None:
    """`run --data X` then a bare `finalize`: the study remembers X, and the error says to pass it."""
    error = one_line_error(finalize(finalized, "--data", str(tmp_path / "moved")))
    assert str(tmp_path / "moved") in error and f"--data {tiny_fer}" in error


def test_resume_files_hold_the_weights_model_pt_ships(finalized: Path) -> None:
    m = metrics_of(final_dir(finalized))
    [seed] = m.shipped.seeds
    training, evaluation = (torch.load(p, weights_only=True) for p in seed_files(finalized, "best", seed))
    resumed = training["state"]
    [shipped] = torch.load(final_dir(finalized) / "model.pt", weights_only=True)["members"]
    assert list(resumed) == list(shipped)
    assert all(resumed[k].dtype == shipped[k].dtype and torch.equal(resumed[k], shipped[k]) for k in shipped)
    run = SeedRun.from_json(evaluation["run"])  # and the run the metrics report
    figures = m.best.per_seed[str(seed)]
    assert (run.seed, run.best_epoch, run.private_test, run.test_all) == (
        seed,
        figures.best_epoch,
        figures.private_test,
        figures.test_all,
    )


def test_the_largest_architecture_ships_in_16_mib_and_predict_scores_its_metrics(tmp_path: Path) -> None:
    from conftest import write_tiny_fer

    faces = write_tiny_fer(tmp_path / "faces", per_class=(4, 1, 4))  # few training images: the model is large
    folder = searched(tmp_path / "study", faces, "[space]\nwidth = 2.0\nconvs_per_block = 2\nlinear_depth = 3\n")
    result = finalize(folder, "--seeds", "1", "--no-baseline", "--device", "cpu")
    assert result.exit_code == 0, result.output
    model = final_dir(folder) / "model.pt"
    assert model.stat().st_size <= 16 * 2**20
    loaded = load_model(model)
    assert (loaded.params.width, loaded.params.convs_per_block, loaded.params.linear_depth) == (2.0, 2, 3)
    images = sorted(faces.glob("test/*/PrivateTest_*.jpg"))
    truth = [CLASSES.index(p.parent.name) for p in images]
    predicted = [CLASSES.index(p.label) for p in predict_images(loaded, images)]
    m = metrics_of(final_dir(folder))
    assert predicted_report(truth, predicted) == m.shipped.private_test  # not only as many right: the same answers


@contextmanager
def one_core() -> Iterator[None]:
    """CPU training is deterministic per seed at a given thread count: give every process the same one."""
    cores, threads = os.sched_getaffinity(0), torch.get_num_threads()
    os.sched_setaffinity(0, {min(cores)})  # inherited by the processes it starts
    try:
        yield
    finally:
        os.sched_setaffinity(0, cores)
        torch.set_num_threads(threads)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)")
def test_jobs_2_gives_the_seeds_jobs_1_gives(finalized: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(finalized, tmp_path / "study"))
    results = {}
    with one_core():
        for jobs in ("1", "2"):
            shutil.rmtree(resume_dir(folder))
            results[jobs] = finalize(
                folder,
                "--seeds",
                "2",
                "--epochs",
                "1",
                "--device",
                "cpu",
                "--jobs",
                jobs,
                "--top-k",  # a re-ranking of 2 runs: its processes load no test split, the final ones do
                "2",
                "--selection-seeds",
                "1",
                "--no-baseline",
                "--out",
                str(tmp_path / jobs),
            )
            assert results[jobs].exit_code == 0, results[jobs].output
    one, two = metrics_of(tmp_path / "1"), metrics_of(tmp_path / "2")
    assert one.best.per_seed == two.best.per_seed  # val_acc, best epoch, every test figure
    assert (one.best_flipped, one.selection, one.shipped) == (two.best_flipped, two.selection, two.shipped)
    assert sorted(trained(results["1"])) == sorted(trained(results["2"]))  # every epoch line came through
    trainings = [p for p in resume_dir(folder).glob("*.pt") if not p.name.endswith(".eval.pt")]
    assert len(trained(results["2"])) == len(trainings)  # one epoch each


def test_when_the_best_trial_is_the_baseline_each_seed_trains_once(tmp_path: Path, tiny_fer: Path) -> None:
    folder = searched(tmp_path, tiny_fer)
    result = finalize(folder, "--seeds", "2", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert trained(result) == ["best seed 0", "best seed 1"]  # one epoch each
    assert sorted(p.name.split("-", 1)[0] for p in resume_dir(folder).glob("*.pt")) == ["seed0"] * 2 + ["seed1"] * 2
    m = metrics_of(final_dir(folder))
    assert m.best_trial.number == 0 and m.best_trial.params == BASELINE
    assert m.baseline == m.best and set(m.best.per_seed) == {"0", "1"}


def test_jobs_0_exits_2_naming_the_key(finalized: Path) -> None:
    assert "finalize.jobs = 0" in one_line_error(finalize(finalized, "--jobs", "0"))


def test_a_seed_process_error_is_one_error_here_and_stops_the_others(tmp_path: Path, tiny_fer: Path) -> None:
    (tmp_path / "search.toml").write_text(f'[data]\npath = "{tmp_path / "gone"}"\n[finalize]\njobs = 2\n')
    config = load_config(tmp_path / "search.toml", {"run.device": "cpu"})
    with pytest.raises(UserError, match=f"^best seed 0: .*{tmp_path / 'gone'}"):  # the child's UserError
        train_in_processes([SeedJob("best", BASELINE, 0)], config, 1, tmp_path / "runs", print, True)
    config = load_config(tmp_path / "search.toml", {"run.device": "cpu", "data.path": tiny_fer})
    broken = dataclasses.replace(BASELINE, dropout_pattern="sometimes")
    events: list[object] = []
    with pytest.raises(Crashed, match="^best seed 0: ValueError: unknown dropout_pattern 'sometimes'"):
        train_in_processes(
            [SeedJob("best", broken, 0), SeedJob("best", BASELINE, 1)],
            config,
            500,
            tmp_path / "runs",
            events.append,
            True,
        )
    assert not any(isinstance(e, SeedEpoch) and e.epoch == 500 for e in events)  # seed 1 was stopped, not waited for
    assert not list((tmp_path / "runs").glob("*.pt"))


def test_a_parent_that_lost_its_interrupt_stops_its_seed_processes(tmp_path: Path, tiny_fer: Path) -> None:
    config = load_config(None, {"run.device": "cpu", "data.path": tiny_fer})
    epochs: list[int] = []

    def lose_an_interrupt(event: object) -> None:  # in the parent, which drains the children's messages
        if isinstance(event, SeedEpoch):
            epochs.append(event.epoch)
            assert epochs != [1] or swallowed_interrupt(signal.SIGTERM)

    with signals_interrupt(), pytest.raises(Terminated):
        train_in_processes([SeedJob("best", BASELINE, 0)], config, 500, tmp_path / "runs", lose_an_interrupt, True)
    assert epochs and max(epochs) < 500


def test_a_seed_process_that_cannot_start_raises_its_own_error(
    tmp_path: Path, tiny_fer: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(_process: object) -> None:
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refuse)
    config = load_config(None, {"run.device": "cpu", "data.path": tiny_fer})
    with pytest.raises(OSError, match="Resource temporarily unavailable"):  # not a failure to stop it
        train_in_processes([SeedJob("best", BASELINE, 0)], config, 1, tmp_path / "runs", print, True)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_ctrl_c_stops_every_seed_process_and_keeps_finished_seeds(tmp_path: Path, tiny_fer: Path) -> None:
    folder = searched(tmp_path / "study", tiny_fer)
    log = tmp_path / "finalize.log"
    command = [
        sys.executable,
        "-m",
        "fer_search",
        "finalize",
        "--config",
        str(folder / "search.toml"),
        "--device",
        "cpu",
        "--seeds",
        "3",
        "--epochs",
        "2",
        "--jobs",
        "2",
    ]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    try:
        deadline = time.monotonic() + 180
        while not list(resume_dir(folder).glob("*.eval.pt")):  # a seed has finished
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGINT)  # to the parent alone: it must stop the seed processes itself
        assert proc.wait(timeout=60) == 130, log.read_text()
        deadline = time.monotonic() + 30
        while live_in_session(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert live_in_session(proc.pid) == [], log.read_text()
    finally:
        if live_in_session(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
    kept = len(list(resume_dir(folder).glob("*.eval.pt")))
    assert 1 <= kept < 3, log.read_text()  # the third seed's process was still starting
    result = finalize(folder, "--device", "cpu", "--seeds", "3", "--epochs", "2")
    assert result.exit_code == 0, result.output
    assert result.stderr.count("reusing its finished run") == kept
    assert len(trained(result)) == 2 * (3 - kept)


# --- re-ranking, flip averaging and the ensemble, on a constructed study ---------------------

SOUND = dataclasses.replace(
    BASELINE,
    lr=3e-3,
    batch_size=16,
    width=0.5,
    linear_depth=1,
    scheduler="cosine",
    dropout_pattern="none",
    dropout_high=None,
    dropout_low=None,
    dropout_head=None,
)
HOPELESS = dataclasses.replace(SOUND, lr=1e-7)  # learns nothing in a few epochs: stays near chance


def added_trial(study: optuna.Study, value: float, params: TrialParams) -> int:
    """A complete trial scored `value` by the search, whose configuration is `params`; its number."""
    study.add_trial(
        optuna.trial.create_trial(value=value, user_attrs={"trial_params": params.to_dict(), "best_epoch": 1})
    )
    return study.trials[-1].number


@pytest.fixture(scope="module")
def constructed(tmp_path_factory: pytest.TempPathFactory, tiny_fer: Path) -> tuple[Path, int, int]:
    """A study whose best search score (99%) is a lucky configuration that learns nothing, and whose runner-up
    (50%) learns the tiny data: the folder, the lucky trial's number, the sound one's."""
    folder = searched(tmp_path_factory.mktemp("constructed"), tiny_fer)
    study = optuna.load_study(study_name="fer2013", storage=f"sqlite:///{folder}/studies/fer2013.db")
    return folder, added_trial(study, 0.99, HOPELESS), added_trial(study, 0.5, SOUND)


RERANKED = ("--top-k", "2", "--selection-seeds", "2", "--seeds", "2", "--epochs", "3", "--no-baseline")


def test_reranking_finalizes_the_best_retrained_trial_not_the_search_best(
    constructed: tuple[Path, int, int], tmp_path: Path
) -> None:
    folder, lucky, sound = constructed
    result = finalize(folder, *RERANKED, "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    m = metrics_of(tmp_path)
    assert m.selection is not None and m.selection.seeds == [0, 1] and m.selection.top_k == 2
    first, second = m.selection.candidates
    assert (first.number, first.value, second.number, second.value) == (lucky, 0.99, sound, 0.5)
    assert first.params == HOPELESS and set(first.val_accs) == {"0", "1"}
    assert first.mean == pytest.approx(np.mean(list(first.val_accs.values())))
    assert first.mean < 0.3 < second.mean  # retrained, the lucky score does not hold up
    assert m.selection.chosen == m.best_trial.number == m.shipped.trial == sound and m.best_trial.params == SOUND
    assert m.selection.overstated_by == pytest.approx(0.5 - second.mean)
    epochs = [f"trial {n} seed {s}" for n in (lucky, sound) for s in (0, 1) for _ in range(3)]  # 3 epochs each
    assert sorted(trained(result)) == sorted(epochs)
    assert "best seed 0: trained earlier" in result.stderr  # the winner's re-ranking runs are its finalize seeds
    page = (tmp_path / "report.html").read_text()
    assert f"#{lucky}" in page and f"#{sound}" in page


def test_top_k_1_finalizes_the_search_best_as_it_is(constructed: tuple[Path, int, int], tmp_path: Path) -> None:
    folder, lucky, _ = constructed
    result = finalize(folder, *RERANKED, "--top-k", "1", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    m = metrics_of(tmp_path)
    assert m.selection is None and m.best_trial.number == lucky and m.best_trial.params == HOPELESS
    assert trained(result) == []  # the re-ranking above trained these seeds already (same key)


def predicted_by_cli(model: Path, images: list[Path]) -> list[dict[str, Any]]:
    result = CliRunner().invoke(main, ["predict", "--model", str(model), "--json", *map(str, images)])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.mark.parametrize("flip", ["on", "off"])
def test_predict_reproduces_a_shipped_ensemble_as_metrics_json_claims(
    constructed: tuple[Path, int, int], tiny_fer: Path, tmp_path: Path, flip: str
) -> None:
    folder, _, sound = constructed
    result = finalize(folder, *RERANKED, "--ensemble", "--flip", flip, "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    m = metrics_of(tmp_path)
    assert m.ensemble is not None and m.ensemble.seeds == [0, 1]
    assert (m.shipped.trial, m.shipped.seeds, m.shipped.ensemble, m.shipped.flip) == (sound, [0, 1], True, flip == "on")
    assert m.flip.mode == flip and m.flip.used == (flip == "on") and "ensemble" in m.flip.decided_on
    claimed = m.ensemble.flipped if flip == "on" else m.ensemble.plain
    assert m.shipped.private_test == claimed.private_test and m.shipped.val_acc == claimed.val_acc
    loaded = load_model(tmp_path / "model.pt")
    assert (loaded.members, loaded.flip, loaded.meta["seeds"]) == (2, flip == "on", [0, 1])
    images = sorted(tiny_fer.glob("test/*/PrivateTest_*.jpg"))
    lines = predicted_by_cli(tmp_path / "model.pt", images)
    truth = [CLASSES.index(p.parent.name) for p in images]
    assert predicted_report(truth, [CLASSES.index(line["label"]) for line in lines]) == m.shipped.private_test


def test_an_ensemble_of_one_seed_ships_that_seed_alone(constructed: tuple[Path, int, int], tmp_path: Path) -> None:
    folder, _, sound = constructed
    result = finalize(folder, *RERANKED, "--seeds", "1", "--ensemble", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "--ensemble with one seed: that seed is shipped alone" in result.stderr
    m = metrics_of(tmp_path)
    assert (m.shipped.seeds, m.shipped.ensemble, m.ensemble) == ([0], False, None)
    assert "the mean of seeds 0" in m.flip.decided_on
    assert load_model(tmp_path / "model.pt").members == 1


def test_an_ensemble_too_big_for_16_mib_is_refused_before_any_training(tmp_path: Path, tiny_fer: Path) -> None:
    folder = searched(tmp_path, tiny_fer)
    study = optuna.load_study(study_name="fer2013", storage=f"sqlite:///{folder}/studies/fer2013.db")
    largest = dataclasses.replace(BASELINE, width=2.0, convs_per_block=2, linear_depth=3)  # about 11 MiB stored
    number = added_trial(study, 0.99, largest)
    result = finalize(folder, "--ensemble", "--seeds", "2", "--top-k", "1")
    error = one_line_error(result)
    assert f"--ensemble: 2 seeds of trial #{number} would make model.pt about" in error
    assert "16 MiB" in error and "leave --ensemble out" in error
    assert not resume_dir(folder).exists() or not list(resume_dir(folder).iterdir())


def test_the_test_split_is_read_only_once_the_reranking_has_chosen(
    constructed: tuple[Path, int, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fer_search.finalize as finalize_module

    events: list[tuple[str, object]] = []
    load, train = finalize_module.load_configured, finalize_module._trained_seed

    def loading(config: Any, with_test: bool = False) -> Any:
        events.append(("load", with_test))
        return load(config, with_test=with_test)

    def training(job: SeedJob, *args: Any) -> Any:
        events.append(("train", job.label))
        return train(job, *args)

    monkeypatch.setattr(finalize_module, "load_configured", loading)
    monkeypatch.setattr(finalize_module, "_trained_seed", training)
    folder, lucky, sound = constructed
    result = finalize(folder, *RERANKED, "--epochs", "1", "--seeds", "3", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    reranking = [e for e in events if e[0] == "train" and str(e[1]).startswith("trial ")]
    assert len(reranking) == 4 and ("train", "best seed 2") in events
    assert events.count(("load", True)) == 1  # the test split is loaded once ...
    assert events.index(("load", True)) > max(events.index(e) for e in reranking)  # ... after the re-ranking
    assert events.index(("load", True)) < events.index(("train", "best seed 2"))
