"""Finalize's reports: every file written, real images, a self-contained page, few-trial studies."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.image
import numpy as np
import optuna
import pytest
from matplotlib.figure import Figure

from fer_search import report
from fer_search.data import CLASSES
from fer_search.errors import UserError
from fer_search.finalize import REPORTED_BASELINE, aggregate
from fer_search.metrics import classification_report
from fer_search.report import SeedRun, write_reports
from fer_search.model import BASELINE

FILES = ["epoch_accs.json", "recalls_precisions.txt", "confusion.png", "performance.png", "misclassified.png",
         "search_history.png", "param_importances.png", "report.html"]
FIGURES = [f for f in FILES if f.endswith(".png")]
SEEDS = [0, 1, 2]
N_TEST, N_PUBLIC, EPOCHS = 150, 100, 8
STUDY_NAME = "fer<2013>&co"  # must come out escaped in the page
COMMAND = "fer-search finalize --study 'fer<2013>&co' --seeds 3"
RUN_COMMAND = "fer-search run --trials 8 --study 'fer<2013>&co'"

optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclasses.dataclass(frozen=True)
class Inputs:
    metrics: dict[str, Any]
    shipped: SeedRun
    baseline: SeedRun
    images: np.ndarray
    labels: np.ndarray
    study: optuna.Study


def fake_run(kind: str, seed: int, labels: np.ndarray, public_labels: np.ndarray) -> SeedRun:
    """A run whose reports, predictions and history agree with each other."""
    rng = np.random.default_rng([seed, kind == "best"])

    def predict(y: np.ndarray) -> np.ndarray:
        return np.where(rng.random(y.size) < 0.6, y, rng.integers(0, len(CLASSES), y.size))

    pred, public_pred = predict(labels), predict(public_labels)
    val_acc = np.sort(rng.uniform(0.3, 0.65, EPOCHS))
    history = [{"epoch": e + 1, "train_loss": 1.8 - 0.1 * e, "train_acc": 0.3 + 0.04 * e, "val_loss": 1.7 - 0.08 * e,
                "val_acc": float(val_acc[e]), "lr": 1e-3, "seconds": 2.0, "images_per_s": 9000.0}
               for e in range(EPOCHS)]
    return SeedRun(
        kind=kind, seed=seed, best_epoch=EPOCHS, val_acc=float(val_acc[-1]), history=history,
        private_test=classification_report(labels, pred, CLASSES),
        test_all=classification_report(np.concatenate([public_labels, labels]), np.concatenate([public_pred, pred]),
                                       CLASSES),
        test_pred=pred.tolist(), test_conf=rng.uniform(0.2, 1.0, labels.size).tolist(),
    )


def toy_study(n_complete: int, n_pruned: int = 1, name: str = STUDY_NAME) -> optuna.Study:
    """An in-memory study with a couple of parameters and intermediate values, some trials pruned."""
    study = optuna.create_study(direction="maximize", study_name=name, sampler=optuna.samplers.RandomSampler(seed=0))

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", 1e-4, 3e-3, log=True)
        pattern = trial.suggest_categorical("dropout_pattern", ["none", "head", "interlaced"])
        value = 0.5 + 20 * lr + (0.05 if pattern == "interlaced" else 0.0)
        if trial.number == n_pruned:
            trial.set_user_attr("baseline", True)
        for epoch in range(1, 4):
            trial.report(value * epoch / 3, epoch)
        if trial.number < n_pruned:
            raise optuna.TrialPruned()
        return value

    study.optimize(objective, n_trials=n_pruned + n_complete)
    return study


def fake_inputs(study: optuna.Study) -> Inputs:
    rng = np.random.default_rng(7)
    labels = rng.integers(0, len(CLASSES), N_TEST)
    public = rng.integers(0, len(CLASSES), N_PUBLIC)
    images = rng.integers(0, 256, (N_TEST, 48, 48), dtype=np.uint8)
    best = [fake_run("best", s, labels, public) for s in SEEDS]
    baseline = [fake_run("baseline", s, labels, public) for s in SEEDS]
    shipped = max(best, key=lambda r: r.val_acc)
    metrics = {
        "shipped_seed": shipped.seed, "epochs": EPOCHS, "seeds": SEEDS,
        "best_trial": {"number": 3, "value": 0.6543, "params": {**BASELINE.to_dict(), "lr": 0.0021,
                                                                "dropout_pattern": "none", "dropout_high": None,
                                                                "dropout_low": None, "dropout_head": None}},
        "best": aggregate(best), "baseline": aggregate(baseline),
        "baseline_reported": {"accuracy": REPORTED_BASELINE,
                              "note": "reported by the documented project, on its own split"},
        "protocol": {"train": "Training", "val": "PublicTest", "test": "PrivateTest",
                     "test_all": "PublicTest + PrivateTest (includes the validation split)"},
        "data": {"fingerprints": {"train": "aaa111", "val": "bbb222", "test": "ccc333"}},
        "versions": {"python": "3.11.7", "optuna": optuna.__version__, "torch": "2.11.0"},
        "commands": {"run": RUN_COMMAND, "finalize": COMMAND},
    }
    baseline_same_seed = next(r for r in baseline if r.seed == shipped.seed)
    return Inputs(metrics, shipped, baseline_same_seed, images, labels, study)


def write(inputs: Inputs, out: Path, with_baseline: bool = True) -> list[Path]:
    return write_reports(out, inputs.metrics, inputs.shipped, inputs.baseline if with_baseline else None,
                         inputs.images, inputs.labels, CLASSES, inputs.study)


@pytest.fixture(scope="module")
def inputs() -> Inputs:
    return fake_inputs(toy_study(n_complete=6, n_pruned=2))


@pytest.fixture(scope="module")
def written(inputs: Inputs, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write(inputs, tmp_path_factory.mktemp("final") / "final")


def assert_real_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    height, width = matplotlib.image.imread(path).shape[:2]
    assert height > 100 and width > 100, (path, height, width)


def test_every_file_is_written_and_returned(written: list[Path]) -> None:
    assert [p.name for p in written] == FILES
    assert all(p.is_file() and p.stat().st_size > 0 for p in written)
    assert not [p for p in written[0].parent.iterdir() if p.name not in FILES]  # no temporary files left


def test_figures_are_real_images(written: list[Path]) -> None:
    for path in written:
        if path.suffix == ".png":
            assert_real_png(path)


def test_page_is_self_contained_with_every_figure(written: list[Path]) -> None:
    page = (written[0].parent / "report.html").read_text()
    for external in ('src="http', "src='http", 'href="http', "<link", "<script", "@import", "url("):
        assert external not in page
    for name in FIGURES:
        png = (written[0].parent / name).read_bytes()
        assert f'src="data:image/png;base64,{base64.b64encode(png).decode()}"' in page


def test_page_has_the_key_numbers(written: list[Path], inputs: Inputs) -> None:
    page = (written[0].parent / "report.html").read_text()
    m = inputs.metrics
    for agg in (m["best"], m["baseline"]):
        acc = agg["mean"]["private_test"]["accuracy"]
        assert f"{acc:.2%} ± {agg['std']['private_test']['accuracy']:.2%}" in page
        assert f"{agg['mean']['test_all']['accuracy']:.2%}" in page
    assert "61.356%: reported by the documented project, on its own split" in page
    assert page.count("61.356") == 1
    assert "includes the validation split (PublicTest)" in page
    assert "Best trial #3" in page and "65.43%" in page
    baseline_trial = inputs.study.trials[2]
    assert f"Baseline: trial #2, PublicTest accuracy {baseline_trial.value:.2%}" in page
    assert "(shipped)" in page and "baseline" in page
    assert all(c in page for c in CLASSES)
    assert m["versions"]["optuna"] in page and "ccc333" in page
    assert "COMPLETE</td><td>6<" in page and "PRUNED</td><td>2<" in page


def test_page_escapes_what_it_interpolates(written: list[Path]) -> None:
    page = (written[0].parent / "report.html").read_text()
    assert STUDY_NAME not in page and "fer&lt;2013&gt;&amp;co" in page
    assert "fer-search finalize --study &#x27;fer&lt;2013&gt;&amp;co&#x27; --seeds 3" in page
    assert "fer-search run --trials 8 --study &#x27;fer&lt;2013&gt;&amp;co&#x27;" in page


def test_page_says_when_the_study_did_not_record_its_run_command(inputs: Inputs, tmp_path: Path) -> None:
    metrics = {**inputs.metrics, "commands": {"run": None, "finalize": COMMAND}}
    write(dataclasses.replace(inputs, metrics=metrics), tmp_path)
    page = (tmp_path / "report.html").read_text()
    assert "not recorded" in page and "fer-search finalize --study" in page


def test_text_and_json(written: list[Path], inputs: Inputs) -> None:
    folder = written[0].parent
    text = (folder / "recalls_precisions.txt").read_text()
    assert all(c in text for c in CLASSES)
    assert "Baseline (the documented configuration" in text and "± " in text
    support = inputs.shipped.private_test["per_class"]["happy"]["support"]
    assert any(line.split()[:1] == ["happy"] and line.split()[-1] == str(support) for line in text.splitlines())
    epochs = json.loads((folder / "epoch_accs.json").read_text())
    assert [h["val_acc"] for h in epochs["best"]] == [h["val_acc"] for h in inputs.shipped.history]
    assert len(epochs["baseline"]) == EPOCHS and {"train_acc", "val_loss", "lr"} <= epochs["baseline"][0].keys()


def test_without_baseline(inputs: Inputs, tmp_path: Path) -> None:
    no_baseline = dataclasses.replace(inputs, metrics={**inputs.metrics, "baseline": None})
    written = write(no_baseline, tmp_path, with_baseline=False)
    assert [p.name for p in written] == FILES
    page = (tmp_path / "report.html").read_text()
    assert "not retrained" in page and "baseline (seed" not in page and "the baseline were" not in page
    assert json.loads((tmp_path / "epoch_accs.json").read_text())["baseline"] is None
    assert "Baseline (the documented configuration" not in (tmp_path / "recalls_precisions.txt").read_text()


def test_an_unwritable_folder_is_a_user_error_naming_it(inputs: Inputs, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match=re.escape(str(blocker / "final"))):
        write(inputs, blocker / "final")


def test_one_seed_has_no_std(inputs: Inputs, tmp_path: Path) -> None:
    one_seed = {**inputs.metrics, "seeds": [inputs.shipped.seed],
                "best": aggregate([inputs.shipped]), "baseline": aggregate([inputs.baseline])}
    write(dataclasses.replace(inputs, metrics=one_seed), tmp_path)
    assert "±" not in (tmp_path / "report.html").read_text()


@pytest.mark.parametrize("n_complete", [0, 1])
def test_few_complete_trials_still_give_both_optuna_figures(inputs: Inputs, tmp_path: Path, n_complete: int) -> None:
    write(dataclasses.replace(inputs, study=toy_study(n_complete)), tmp_path)
    for name in ("search_history.png", "param_importances.png"):
        assert_real_png(tmp_path / name)


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> list[Figure]:
    """Every figure the report saves, kept for inspection."""
    saved: list[Figure] = []
    save = report._png

    def keep(fig: Figure) -> bytes:
        saved.append(fig)
        return save(fig)

    monkeypatch.setattr(report, "_png", keep)
    return saved


def conditional_study(n_complete: int) -> optuna.Study:
    """Trial 0 alone uses `extra`: PedANOVA warns that the parameter's regimes are too small, at any size."""
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))

    def objective(trial: optuna.Trial) -> float:
        value = trial.suggest_float("lr", 1e-4, 3e-3, log=True)
        if trial.number == 0:
            value += trial.suggest_float("extra", 0, 1)
        return value

    study.optimize(objective, n_trials=n_complete)
    return study


def drawn_notes(plot: Callable[[optuna.Study, str], bytes], study: optuna.Study, figures: list[Figure]) -> list[str]:
    """The notes `plot` draws below the figure, in one line each; fails on any warning that escapes."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plot(study, "PublicTest")
    assert [str(w.message) for w in caught] == []
    return [" ".join(t.get_text().split()) for t in figures[-1].texts]


@pytest.mark.parametrize("plot", [report.search_history_png, report.param_importances_png])
def test_few_complete_trials_are_said_below_both_optuna_figures(plot: Callable[[optuna.Study, str], bytes],
                                                                 figures: list[Figure]) -> None:
    notes = drawn_notes(plot, toy_study(n_complete=3, n_pruned=2), figures)
    assert len(notes) == 1
    assert "Only 3 complete trials (fewer than 10)" in notes[0]
    assert "Pruned trials (2 here) are not shown, and the importances do not count them" in notes[0]


def test_optunas_warnings_on_few_trials_become_the_note(figures: list[Figure]) -> None:
    notes = drawn_notes(report.param_importances_png, conditional_study(3), figures)
    assert len(notes) == 1 and notes[0].startswith("Only 3 complete trials")


def test_enough_trials_draw_no_note_but_optunas_own_warnings(figures: list[Figure]) -> None:
    assert drawn_notes(report.search_history_png, toy_study(n_complete=10), figures) == []
    assert drawn_notes(report.param_importances_png, toy_study(n_complete=10), figures) == []
    notes = drawn_notes(report.param_importances_png, conditional_study(10), figures)
    assert len(notes) == 1
    assert notes[0].startswith("Optuna warns: Some regimes for parameter `extra`") and "inaccurate" in notes[0]


def test_training_curves_count_whole_epochs(inputs: Inputs, figures: list[Figure]) -> None:
    two_epochs = dataclasses.replace(inputs.shipped, history=inputs.shipped.history[:2], best_epoch=2)
    report.performance_png(two_epochs, None, "shipped model", "PublicTest")
    for ax in figures[-1].axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(t == int(t) for t in ticks), ticks


def test_study_optuna_cannot_plot_still_gives_figures(inputs: Inputs, tmp_path: Path) -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.optimize(lambda t: (t.suggest_float("x", 0, 1), t.suggest_float("y", 0, 1)), n_trials=3)
    write(dataclasses.replace(inputs, study=study), tmp_path)
    for name in ("search_history.png", "param_importances.png"):
        assert_real_png(tmp_path / name)


def test_leaves_matplotlib_as_it_found_it(inputs: Inputs, tmp_path: Path) -> None:
    from matplotlib import pyplot as plt

    before = dict(matplotlib.rcParams)
    write(inputs, tmp_path)
    assert dict(matplotlib.rcParams) == before  # Optuna's ggplot style stays inside the report
    assert plt.get_fignums() == []
