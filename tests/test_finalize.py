"""finalize: retrain best + baseline over seeds, evaluate on the test set, write every report file."""

from __future__ import annotations

import dataclasses
import html
import json
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
from test_results import METRICS_KEYS

from fer_search.cli import main
from fer_search.config import load_config
from fer_search.data import CLASSES
from fer_search.errors import Crashed, UserError
from fer_search.finalize import SeedJob, train_in_processes
from fer_search.model import BASELINE
from fer_search.predict import load_model, model_from_state, predict_images
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
    assert m.best_trial.number == study.best_trial.number and m.best_trial.value == study.best_value
    assert m.seeds == [0, 1] and m.shipped_seed in (0, 1) and m.epochs == 2
    for agg in (m.best, m.baseline):
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
    shipped = m.best.per_seed[str(m.shipped_seed)]
    assert shipped.val_acc == max(r.val_acc for r in m.best.per_seed.values())


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
    correct = sum(line["label"] == Path(line["path"]).parent.name for line in lines)
    assert correct / len(images) == m.best.per_seed[str(m.shipped_seed)].private_test.accuracy


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
    kinds_and_seeds = {r.name.rsplit("-", 1)[0] for r in resume_dir(finalized).glob("*.pt")}
    kinds = ("best",) if best_is_baseline(finalized) else ("best", "baseline")
    assert {f"{kind}-seed{seed}" for kind in kinds for seed in (0, 1)} <= kinds_and_seeds
    before = metrics_of(final_dir(finalized))
    result = finalize(finalized, "--seeds", "2")
    assert result.exit_code == 0
    assert result.stderr.count("reusing the finished run") == 2 * len(kinds)
    assert metrics_of(final_dir(finalized)).best == before.best


def test_interrupted_finalize_retrains_only_the_unfinished_seed(finalized: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(finalized, tmp_path / "study"))  # the session's study stays as it is
    next(resume_dir(folder).glob("best-seed1-*.pt")).unlink()  # interrupted while training the best trial's seed 1
    (final_dir(folder) / "metrics.json").unlink()
    result = finalize(folder, "--seeds", "2")
    assert result.exit_code == 0, result.output
    assert result.stderr.count("reusing the finished run") == (1 if best_is_baseline(folder) else 3)
    assert set(trained(result)) == {"best seed 1"}
    m = metrics_of(final_dir(folder))
    assert m.baseline is not None and set(m.best.per_seed) == set(m.baseline.per_seed) == {"0", "1"}
    assert m.best.std is not None
    assert len(list(resume_dir(folder).glob("best-seed1-*.pt"))) == 1


def test_a_finalize_interrupted_while_evaluating_keeps_the_training(
    finalized: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fer_search.finalize as finalize_module

    folder = Path(shutil.copytree(finalized, tmp_path / "study"))
    next(resume_dir(folder).glob("best-seed1-*.pt")).unlink()
    evaluated = finalize_module._evaluated_run

    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt  # Ctrl-C during the CPU pass over the test splits

    monkeypatch.setattr(finalize_module, "_evaluated_run", interrupted)
    assert finalize(folder, "--seeds", "2").exit_code == 130
    assert len(list(resume_dir(folder).glob("best-seed1-*.trained.pt"))) == 1
    monkeypatch.setattr(finalize_module, "_evaluated_run", evaluated)
    result = finalize(folder, "--seeds", "2")
    assert result.exit_code == 0, result.output
    assert trained(result) == [] and "best seed 1: trained by an interrupted finalize" in result.stderr
    assert not list(resume_dir(folder).glob("*.trained.pt"))  # the finished run replaced it
    assert metrics_of(final_dir(folder)).best.per_seed == metrics_of(final_dir(finalized)).best.per_seed


def shrunk_first_weight(doc: dict[str, Any]) -> None:
    doc["state"][next(iter(doc["state"]))] = torch.zeros(3)


def as_trained_doc(doc: dict[str, Any]) -> dict[str, Any]:
    """A finished resume file's document as the trained, not yet evaluated, one it was before."""
    run = SeedRun.from_json(doc["run"])
    fields = {"best_epoch": run.best_epoch, "val_acc": run.val_acc, "history": json.dumps(run.history)}
    return {"key": doc["key"], "state": doc["state"], **fields}


@pytest.mark.parametrize(
    "trained_only, change",
    [
        pytest.param(False, shrunk_first_weight, id="finished, weights of another shape"),
        pytest.param(False, lambda doc: doc.update(run=json.loads(doc["run"])), id="finished, run not JSON text"),
        pytest.param(True, shrunk_first_weight, id="trained, weights of another shape"),
        pytest.param(True, lambda doc: doc.update(history=json.loads(doc["history"])), id="trained, history not JSON"),
    ],
)
def test_a_resume_file_that_does_not_fit_is_trained_again(
    finalized: Path, tmp_path: Path, trained_only: bool, change: Callable[[dict[str, Any]], None]
) -> None:
    """A resume file under the right name and key whose contents finalize could not use: one line, then retrained."""
    folder = Path(shutil.copytree(finalized, tmp_path / "study"))
    path = finished_path = next(resume_dir(folder).glob("best-seed1-*.pt"))
    doc = torch.load(path, weights_only=True)
    if trained_only:
        path.unlink()
        path, doc = path.with_suffix(".trained.pt"), as_trained_doc(doc)
    change(doc)
    torch.save(doc, path)
    result = finalize(folder, "--seeds", "2")
    assert result.exit_code == 0, result.output
    assert f"best seed 1: cannot reuse {path} (" in result.stderr and "Traceback" not in result.output
    assert set(trained(result)) == {"best seed 1"}
    assert not path.with_suffix(".trained.pt").exists()
    state = torch.load(finished_path, weights_only=True)["state"]
    model_from_state(metrics_of(final_dir(folder)).best_trial.params, state, len(CLASSES))  # fits now


def test_no_baseline_and_out(finalized: Path, tmp_path: Path) -> None:
    before = set(resume_dir(finalized).iterdir())
    result = finalize(finalized, "--seeds", "1", "--no-baseline", "--out", str(tmp_path / "out"), "--epochs", "1")
    assert result.exit_code == 0, result.output
    m = metrics_of(tmp_path / "out")
    assert m.baseline is None and m.best.std is None and m.epochs == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(FILES)
    new = set(resume_dir(finalized).iterdir()) - before  # --out moves the outputs, not the resume files
    assert [p.name.rsplit("-", 1)[0] for p in new] == ["best-seed0"]


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
    docs = [torch.load(p, weights_only=True) for p in resume_dir(finalized).glob(f"best-seed{m.shipped_seed}-*.pt")]
    [doc] = [d for d in docs if d["key"]["epochs"] == m.epochs]
    resumed = doc["state"]
    shipped = torch.load(final_dir(finalized) / "model.pt", weights_only=True)["state_dict"]
    assert list(resumed) == list(shipped)
    assert all(resumed[k].dtype == shipped[k].dtype and torch.equal(resumed[k], shipped[k]) for k in shipped)
    run = SeedRun.from_json(doc["run"])  # and the run the metrics report
    figures = m.best.per_seed[str(m.shipped_seed)]
    assert (run.seed, run.val_acc, run.private_test, run.test_all) == (
        m.shipped_seed,
        figures.val_acc,
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
    shipped = m.best.per_seed[str(m.shipped_seed)].private_test
    assert sum(t == q for t, q in zip(truth, predicted)) / len(images) == shipped.accuracy
    confusion = np.zeros((7, 7), dtype=int)
    np.add.at(confusion, (truth, predicted), 1)
    assert confusion.tolist() == shipped.confusion  # not only as many right: the same answers


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
                "--out",
                str(tmp_path / jobs),
            )
            assert results[jobs].exit_code == 0, results[jobs].output
    one, two = metrics_of(tmp_path / "1"), metrics_of(tmp_path / "2")
    assert one.best.per_seed == two.best.per_seed  # val_acc, best epoch, every test figure
    assert one.baseline == two.baseline
    assert sorted(trained(results["1"])) == sorted(trained(results["2"]))  # every epoch line came through
    assert len(trained(results["2"])) == len(list(resume_dir(folder).glob("*.pt")))  # one epoch each


def test_when_the_best_trial_is_the_baseline_each_seed_trains_once(tmp_path: Path, tiny_fer: Path) -> None:
    folder = searched(tmp_path, tiny_fer)
    result = finalize(folder, "--seeds", "2", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert trained(result) == ["best seed 0", "best seed 1"]  # one epoch each
    assert sorted(p.name.rsplit("-", 1)[0] for p in resume_dir(folder).glob("*.pt")) == ["best-seed0", "best-seed1"]
    m = metrics_of(final_dir(folder))
    assert m.best_trial.number == 0 and m.best_trial.params == BASELINE
    assert m.baseline == m.best and set(m.best.per_seed) == {"0", "1"}


def test_jobs_0_exits_2_naming_the_key(finalized: Path) -> None:
    assert "finalize.jobs = 0" in one_line_error(finalize(finalized, "--jobs", "0"))


def test_a_seed_process_error_is_one_error_here_and_stops_the_others(tmp_path: Path, tiny_fer: Path) -> None:
    (tmp_path / "search.toml").write_text(f'[data]\npath = "{tmp_path / "gone"}"\n[finalize]\njobs = 2\n')
    config = load_config(tmp_path / "search.toml", {"run.device": "cpu"})
    with pytest.raises(UserError, match=f"^best seed 0: .*{tmp_path / 'gone'}"):  # the child's UserError
        train_in_processes([SeedJob("best", BASELINE, 0)], config, 1, tmp_path / "runs", print)
    config = load_config(tmp_path / "search.toml", {"run.device": "cpu", "data.path": tiny_fer})
    broken = dataclasses.replace(BASELINE, dropout_pattern="sometimes")
    events: list[object] = []
    with pytest.raises(Crashed, match="^best seed 0: ValueError: unknown dropout_pattern 'sometimes'"):
        train_in_processes(
            [SeedJob("best", broken, 0), SeedJob("best", BASELINE, 1)], config, 500, tmp_path / "runs", events.append
        )
    assert not any(isinstance(e, SeedEpoch) and e.epoch == 500 for e in events)  # seed 1 was stopped, not waited for
    assert not list((tmp_path / "runs").glob("*.pt"))


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
        while not list(resume_dir(folder).glob("*.pt")):  # a seed has finished
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
    kept = len(list(resume_dir(folder).glob("*.pt")))
    assert 1 <= kept < 3, log.read_text()  # the third seed's process was still starting
    result = finalize(folder, "--device", "cpu", "--seeds", "3", "--epochs", "2")
    assert result.exit_code == 0, result.output
    assert result.stderr.count("reusing the finished run") == kept
    assert len(trained(result)) == 2 * (3 - kept)
