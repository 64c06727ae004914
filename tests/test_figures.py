"""Finalize's figures: real images, sentences instead of figures that would mean nothing, readable curves, whole
trial and epoch ticks, Optuna's side effects contained."""

from __future__ import annotations

import dataclasses
import io
import warnings
from collections.abc import Callable

import matplotlib
import matplotlib.image
import numpy as np
import optuna
import pytest
from finalizing import Finalized, baseline_won, fake_inputs, toy_study
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from fer_search import figures as figures_module
from fer_search.figures import (
    FIGURE_NAMES,
    Plot,
    misclassified_plot,
    param_importances_plot,
    performance_png,
    report_figures,
    search_history_plot,
)

PLOTS = [search_history_plot, param_importances_plot]


@pytest.fixture(scope="module")
def inputs() -> Finalized:
    return fake_inputs(toy_study(n_complete=12, n_pruned=2))


def assert_real_png(png: bytes | None) -> None:
    assert png is not None and png[:8] == b"\x89PNG\r\n\x1a\n"
    height, width = matplotlib.image.imread(io.BytesIO(png)).shape[:2]
    assert height > 100 and width > 100, (height, width)


def test_every_figure_is_a_real_image(inputs: Finalized) -> None:
    plots = report_figures(inputs)
    assert tuple(plots) == FIGURE_NAMES
    for plot in plots.values():
        assert_real_png(plot.png)


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> list[Figure]:
    """Every figure the module saves, kept for inspection."""
    saved: list[Figure] = []
    save = figures_module._png

    def keep(fig: Figure) -> bytes:
        saved.append(fig)
        return save(fig)

    monkeypatch.setattr(figures_module, "_png", keep)
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


def study_of(objective: Callable[[optuna.Trial], float], n_trials: int) -> optuna.Study:
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(objective, n_trials=n_trials)
    return study


def plotted(plot: Callable[[optuna.Study, str], Plot], study: optuna.Study) -> Plot:
    """What `plot` gives for `study`; fails on any warning that escapes."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = plot(study, "PublicTest")
    assert [str(w.message) for w in caught] == []
    return result


@pytest.mark.parametrize("plot", PLOTS)
def test_no_figure_draws_its_note(plot: Callable[[optuna.Study, str], Plot], figures: list[Figure]) -> None:
    """The page says what to know of a figure; no sentence is drawn into the image."""
    plotted(plot, toy_study(n_complete=3, n_pruned=2))
    plotted(plot, conditional_study(12))
    assert figures and all(fig.texts == [] for fig in figures)


def test_few_complete_trials_are_said_below_the_history() -> None:
    plot = plotted(search_history_plot, toy_study(n_complete=3, n_pruned=2))
    assert_real_png(plot.png)
    assert plot.note is not None and plot.note.startswith("Only 3 complete trials (fewer than 10): too few")
    assert "Pruned trials (2 here) are not shown" in plot.note


def test_a_history_without_complete_trials_is_a_sentence() -> None:
    plot = plotted(search_history_plot, toy_study(n_complete=0, n_pruned=2))
    assert plot == Plot(None, "The search history is left out: no complete trial yet (of 2 trials).")


@pytest.mark.parametrize("n_complete", [0, 1, 9])
def test_importances_of_few_trials_are_a_sentence_not_a_figure(n_complete: int) -> None:
    plot = plotted(param_importances_plot, toy_study(n_complete))
    assert plot.png is None
    assert plot.note == (
        "Parameter importances are left out: they need at least 10 complete trials (Optuna's estimate contrasts "
        f"the best tenth of them with all of them) and this study has {n_complete}."
    )


def test_importances_of_trials_that_all_scored_the_same_are_a_sentence() -> None:
    study = study_of(lambda t: 0.5 + 0 * t.suggest_float("lr", 1e-4, 3e-3) + 0 * t.suggest_int("width", 1, 3), 12)
    plot = plotted(param_importances_plot, study)
    assert plot.png is None and plot.note is not None
    assert "every complete trial scored the same PublicTest accuracy (50.00%)" in plot.note


def test_importances_that_are_all_equal_are_a_sentence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(optuna.importance, "get_param_importances", lambda study: {"lr": 0.5, "width": 0.5})
    plot = plotted(param_importances_plot, toy_study(n_complete=12))
    assert plot.png is None and plot.note is not None
    assert "gives each of the 2 parameters the same importance" in plot.note


def test_importances_of_a_single_parameter_are_a_sentence() -> None:
    plot = plotted(param_importances_plot, study_of(lambda t: t.suggest_float("lr", 1e-4, 3e-3), 12))
    assert plot.png is None and plot.note is not None
    assert "gives each of the 1 parameter the same importance" in plot.note


def test_importances_that_can_be_estimated_are_drawn_with_optunas_warnings_below() -> None:
    plot = plotted(param_importances_plot, toy_study(n_complete=12))
    assert_real_png(plot.png)
    assert plot.note is None
    plot = plotted(param_importances_plot, conditional_study(12))
    assert_real_png(plot.png)
    assert plot.note is not None
    assert plot.note.startswith("Optuna warns: Some regimes for parameter `extra`") and "inaccurate" in plot.note


def whole_ticks(ax: Axes) -> list[float]:
    """The x ticks shown, asserting that there are some and that each is a whole number."""
    low, high = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if low <= t <= high]
    assert ticks and all(t == int(t) for t in ticks), ticks
    return ticks


def test_search_history_counts_whole_trials(figures: list[Figure]) -> None:
    plotted(search_history_plot, toy_study(n_complete=3))
    [ax] = [ax for ax in figures[-1].axes if ax.get_xlabel() == "Trial"]
    assert 0.5 not in whole_ticks(ax) and 1.5 not in ax.get_xticks()


def test_training_curves_count_whole_epochs(inputs: Finalized, figures: list[Figure]) -> None:
    two_epochs = dataclasses.replace(inputs.shipped, history=inputs.shipped.history[:2], best_epoch=2)
    performance_png(two_epochs, None, "shipped model", "PublicTest")
    for ax in figures[-1].axes:
        whole_ticks(ax)


def test_training_curves_draw_the_best_trial_over_the_baseline(inputs: Finalized, figures: list[Figure]) -> None:
    performance_png(inputs.shipped, inputs.baseline, "shipped model", "PublicTest")
    fig = figures[-1]
    for ax in fig.axes:
        best = [line for line in ax.get_lines() if line.get_label().startswith("best trial")]
        baseline = [line for line in ax.get_lines() if line.get_label().startswith("baseline")]
        assert len(best) == len(baseline) == 3  # training, validation, kept epoch
        assert min(line.get_zorder() for line in best) > max(line.get_zorder() for line in baseline)
        assert all(line.get_linewidth() > max(b.get_linewidth() for b in baseline) for line in best)
        assert [line.get_linestyle() for line in best[:2]] == ["-", "-"]
        assert [line.get_linestyle() for line in baseline[:2]] == ["--", "--"]
        assert all((line.get_alpha() or 1.0) < 1.0 for line in baseline)
    [legend] = fig.legends  # one, for both panels, naming every line
    labels = [text.get_text() for text in legend.get_texts()]
    seed = inputs.shipped.seed
    assert f"best trial (seed {seed}): training" in labels
    assert f"baseline (seed {seed}): validation on PublicTest" in labels
    assert "(solid)" in fig.get_suptitle() and "(dashed)" in fig.get_suptitle()


@pytest.mark.parametrize("ensemble, flip", [(False, False), (True, True)])
def test_the_figures_say_what_is_shipped(ensemble: bool, flip: bool, figures: list[Figure]) -> None:
    inputs = fake_inputs(toy_study(n_complete=3), ensemble=ensemble)
    shipped_as = dataclasses.replace(inputs.metrics.shipped, flip=flip)
    report_figures(dataclasses.replace(inputs, metrics=dataclasses.replace(inputs.metrics, shipped=shipped_as)))
    confusion, performance, misclassified = (fig.get_suptitle() for fig in figures[:3])
    seed = inputs.shipped.seed
    shipped = ("ensemble of seeds 0, 1, 2" if ensemble else f"seed {seed}") + (
        ", flip averaged" if flip else ", without flip averaging"
    )
    assert confusion.startswith(f"Confusion matrix of the shipped model (best trial #3, {shipped}) on ")
    assert misclassified.startswith(f"Misclassified PrivateTest faces of the shipped model (best trial #3, {shipped})")
    # The curves are one training's: the shipped seed's, or the ensemble's member of best validation accuracy.
    trained = "shipped ensemble's member of best PublicTest accuracy" if ensemble else "shipped model"
    assert performance.startswith(f"Training curves of the {trained} (best trial #3, seed {seed}) (solid)")


def test_where_the_best_trial_is_the_baseline_its_runs_are_drawn_once(inputs: Finalized) -> None:
    plots = report_figures(baseline_won(inputs))
    assert_real_png(plots["performance.png"].png)
    solo = report_figures(dataclasses.replace(baseline_won(inputs), baseline=None))
    assert plots["performance.png"] == solo["performance.png"]  # no second, identical set of curves


def test_a_model_without_mistakes_gets_a_sentence(inputs: Finalized) -> None:
    perfect = dataclasses.replace(inputs.shipped, test_pred=np.asarray(inputs.test_labels).tolist())
    plot = misclassified_plot(inputs.test_images, inputs.test_labels, perfect, inputs.classes, "model", "PrivateTest")
    assert plot == Plot(None, "No misclassified faces to show: the model classified all 150 correctly.")


def test_a_study_optuna_cannot_plot_gets_a_sentence() -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.optimize(lambda t: (t.suggest_float("x", 0, 1), t.suggest_float("y", 0, 1)), n_trials=3)
    plot = plotted(search_history_plot, study)
    assert plot.png is None and plot.note is not None
    assert plot.note.startswith("The search history is left out: Optuna could not draw it (")


def test_importances_optuna_cannot_estimate_are_a_sentence(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(study: optuna.Study) -> dict[str, float]:
        raise ValueError("no way")

    monkeypatch.setattr(optuna.importance, "get_param_importances", refuse)
    plot = plotted(param_importances_plot, toy_study(n_complete=12))
    assert plot == Plot(None, "Parameter importances are left out: Optuna could not estimate them (no way).")


def test_leaves_matplotlib_as_it_found_it(inputs: Finalized) -> None:
    from matplotlib import pyplot as plt

    before = dict(matplotlib.rcParams)
    report_figures(inputs)
    assert dict(matplotlib.rcParams) == before  # Optuna's ggplot style stays inside the figures
    assert plt.get_fignums() == []
