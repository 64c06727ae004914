"""Finalize's figures: real images, notes on studies of few trials, Optuna's side effects contained."""

from __future__ import annotations

import dataclasses
import io
import warnings
from collections.abc import Callable

import matplotlib
import matplotlib.image
import optuna
import pytest
from finalizing import Finalized, fake_inputs, toy_study
from matplotlib.figure import Figure

from fer_search import figures as figures_module
from fer_search.figures import param_importances_png, performance_png, report_figures, search_history_png

PLOTS = [search_history_png, param_importances_png]


@pytest.fixture(scope="module")
def inputs() -> Finalized:
    return fake_inputs(toy_study(n_complete=6, n_pruned=2))


def figures_of(inputs: Finalized) -> dict[str, bytes]:
    return report_figures(inputs)


def assert_real_png(png: bytes) -> None:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    height, width = matplotlib.image.imread(io.BytesIO(png)).shape[:2]
    assert height > 100 and width > 100, (height, width)


def test_every_figure_is_a_real_image(inputs: Finalized) -> None:
    pngs = figures_of(inputs)
    assert list(pngs) == [
        "confusion.png",
        "performance.png",
        "misclassified.png",
        "search_history.png",
        "param_importances.png",
    ]
    for png in pngs.values():
        assert_real_png(png)


@pytest.mark.parametrize("n_complete", [0, 1])
@pytest.mark.parametrize("plot", PLOTS)
def test_few_complete_trials_still_give_both_optuna_figures(
    plot: Callable[[optuna.Study, str], bytes], n_complete: int
) -> None:
    assert_real_png(plot(toy_study(n_complete), "PublicTest"))


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


def drawn_notes(plot: Callable[[optuna.Study, str], bytes], study: optuna.Study, figures: list[Figure]) -> list[str]:
    """The notes `plot` draws below the figure, in one line each; fails on any warning that escapes."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plot(study, "PublicTest")
    assert [str(w.message) for w in caught] == []
    return [" ".join(t.get_text().split()) for t in figures[-1].texts]


@pytest.mark.parametrize("plot", PLOTS)
def test_few_complete_trials_are_said_below_both_optuna_figures(
    plot: Callable[[optuna.Study, str], bytes], figures: list[Figure]
) -> None:
    notes = drawn_notes(plot, toy_study(n_complete=3, n_pruned=2), figures)
    assert len(notes) == 1
    assert "Only 3 complete trials (fewer than 10)" in notes[0]
    assert "Pruned trials (2 here) are not shown, and the importances do not count them" in notes[0]


def test_optunas_warnings_on_few_trials_become_the_note(figures: list[Figure]) -> None:
    notes = drawn_notes(param_importances_png, conditional_study(3), figures)
    assert len(notes) == 1 and notes[0].startswith("Only 3 complete trials")


def test_enough_trials_draw_no_note_but_optunas_own_warnings(figures: list[Figure]) -> None:
    assert drawn_notes(search_history_png, toy_study(n_complete=10), figures) == []
    assert drawn_notes(param_importances_png, toy_study(n_complete=10), figures) == []
    notes = drawn_notes(param_importances_png, conditional_study(10), figures)
    assert len(notes) == 1
    assert notes[0].startswith("Optuna warns: Some regimes for parameter `extra`") and "inaccurate" in notes[0]


def test_training_curves_count_whole_epochs(inputs: Finalized, figures: list[Figure]) -> None:
    two_epochs = dataclasses.replace(inputs.shipped, history=inputs.shipped.history[:2], best_epoch=2)
    performance_png(two_epochs, None, "shipped model", "PublicTest")
    for ax in figures[-1].axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(t == int(t) for t in ticks), ticks


@pytest.mark.parametrize("plot", PLOTS)
def test_study_optuna_cannot_plot_still_gives_figures(plot: Callable[[optuna.Study, str], bytes]) -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.optimize(lambda t: (t.suggest_float("x", 0, 1), t.suggest_float("y", 0, 1)), n_trials=3)
    assert_real_png(plot(study, "PublicTest"))


def test_leaves_matplotlib_as_it_found_it(inputs: Finalized) -> None:
    from matplotlib import pyplot as plt

    before = dict(matplotlib.rcParams)
    figures_of(inputs)
    assert dict(matplotlib.rcParams) == before  # Optuna's ggplot style stays inside the figures
    assert plt.get_fignums() == []
