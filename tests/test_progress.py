"""progress: the words of the log lines, the ETA, the terminal's bars, finalize's lines with their ETA."""

from __future__ import annotations

import io
import logging

import pytest

from fer_search.progress import (
    Eta,
    FinalizePlan,
    FinalizeProgress,
    Progress,
    SearchBars,
    SeedEpoch,
    StudyCount,
    accuracy_text,
    cpu_estimate_text,
    duration_text,
    params_text,
)


@pytest.mark.parametrize(
    "seconds, text",
    [
        (-3, "0 s"),  # clocks that disagree
        (0, "0 s"),
        (0.4, "0 s"),
        (42.4, "42 s"),
        (59.4, "59 s"),
        (59.6, "1 min 00 s"),
        (60, "1 min 00 s"),
        (245, "4 min 05 s"),
        (725, "12 min 05 s"),
        (3599.6, "1 h 00 min"),
        (11220, "3 h 07 min"),
        (3600 * 3 + 7 * 60 + 59, "3 h 07 min"),
    ],
)
def test_durations_read_as_people_say_them(seconds: float, text: str) -> None:
    assert duration_text(seconds) == text


def test_accuracies_are_percents_as_in_the_report() -> None:
    assert accuracy_text(0.48679) == "48.68%"
    assert accuracy_text(None) == accuracy_text(float("nan")) == "-"


def test_params_leave_out_the_unused_dropout_rates() -> None:
    text = params_text({"dropout_pattern": "head", "dropout_high": None, "lr": 0.000123456, "width": 1.5})
    assert text == "dropout_pattern=head lr=0.0001235 width=1.5"


def test_the_cpu_estimate_is_the_study_at_this_pace_and_at_the_largest_model_s() -> None:
    text = cpu_estimate_text(epoch_s=40, epochs=30, trials_left=49, workers=2, largest=4.0)
    assert "40 s" in text and "49 trials left" in text and "2 workers" in text
    assert "would take 8 h 20 min at this trial's pace" in text  # 25 rounds of two trials, 30 epochs of 40 s each
    assert "and up to 33 h 20 min if each drew the space's largest model, 4.0x this one's compute;" in text


def test_the_cpu_estimate_of_a_trial_as_large_as_any_has_one_figure() -> None:
    text = cpu_estimate_text(epoch_s=40, epochs=30, trials_left=1, workers=1, largest=1.0)
    assert (
        "1 trial left, at up to 30 epochs each over 1 worker here, would take 20 min 00 s at this trial's pace; pruning"
        in text
        and "largest" not in text
    )


def test_eta_is_the_pace_so_far_times_the_work_left() -> None:
    now = [100.0]
    eta = Eta(10, clock=lambda: now[0])
    assert eta.seconds_left() is None  # no pace yet
    now[0] = 130.0
    eta.step()
    eta.step()
    assert eta.seconds_left() == pytest.approx(15 * 8)


def test_search_bars_show_each_workers_trial_and_the_study() -> None:
    screen = io.StringIO()
    bars = SearchBars(screen)
    bars(StudyCount(finished=3, trials=10))
    bars(Progress(worker=0, trial=4, epoch=0, epochs=30, val_acc=float("nan"), best=0.5, state="STARTED"))
    bars(Progress(worker=1, trial=5, epoch=7, epochs=30, val_acc=float("nan"), best=0.5, state="STARTED"))
    bars(Progress(worker=0, trial=4, epoch=2, epochs=30, val_acc=0.41, best=0.5))
    drawn = screen.getvalue()
    assert "study" in drawn and "3/10 trials" in drawn
    assert "w0 trial 4" in drawn and "2/30 epochs" in drawn and "val 41.00% best 50.00%" in drawn
    assert "w1 trial 5" in drawn and "7/30 epochs" in drawn  # a resumed trial starts where it left off
    bars("2026-11-30 10:00:00 INFO fer_search: trial 3 (worker 1) complete")
    assert "trial 3 (worker 1) complete\n" in screen.getvalue()  # a whole line above the bars
    bars(Progress(worker=0, trial=4, epoch=6, epochs=30, val_acc=0.45, best=0.5, state="PRUNED"))
    bars(StudyCount(finished=4, trials=10))
    assert "w0 waiting for a trial" in screen.getvalue() and "4/10 trials" in screen.getvalue()
    bars.close()


def test_finalize_off_a_terminal_logs_each_epoch_with_the_eta(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "fer_search")
    shown = FinalizeProgress(bar=False, file=io.StringIO())
    shown("best seed 0: reusing the finished run in runs/x.pt")
    shown(FinalizePlan(epochs=4))
    shown(SeedEpoch("best seed 1", 1, 2, 0.4))
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "best seed 0: reusing the finished run in runs/x.pt"
    assert lines[1].startswith("best seed 1: epoch 1/2 val_acc 40.00%; finalize 1/4 epochs, about ")
    assert lines[1].endswith(" left")
    shown.close()


def test_finalize_on_a_terminal_draws_one_bar_over_every_epoch(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "fer_search")
    screen = io.StringIO()
    shown = FinalizeProgress(bar=True, file=screen)
    shown(FinalizePlan(epochs=4))
    shown(SeedEpoch("baseline seed 0", 1, 2, 0.4))
    shown.write_line("a log line")
    assert "finalize" in screen.getvalue() and "1/4 epochs" in screen.getvalue()
    assert "a log line\n" in screen.getvalue()
    assert not [r for r in caplog.records if "epoch 1/2" in r.getMessage()]  # -v alone adds them as lines
    shown.close()


@pytest.mark.parametrize("bar", [True, False])
def test_a_later_phase_adds_its_epochs_to_those_done(bar: bool, caplog: pytest.LogCaptureFixture) -> None:
    """The re-ranking's epochs, then the final seeds': one count, whose total grows once the winner is known."""
    caplog.set_level(logging.INFO, "fer_search")
    screen = io.StringIO()
    shown = FinalizeProgress(bar=bar, file=screen)
    shown(FinalizePlan(epochs=2))
    shown(SeedEpoch("trial 3 seed 0", 1, 2, 0.4))
    shown(SeedEpoch("trial 3 seed 0", 2, 2, 0.5))
    shown(FinalizePlan(epochs=3))
    shown(SeedEpoch("best seed 2", 1, 3, 0.5))
    shown.close()
    shown_text = screen.getvalue() if bar else "\n".join(r.getMessage() for r in caplog.records)
    assert "3/5 epochs" in shown_text and "2/2 epochs" in shown_text


def test_a_workers_bar_names_its_fused_trials_until_the_last_ends() -> None:
    screen = io.StringIO()
    bars = SearchBars(screen)
    for trial in (6, 7, 8):
        bars(Progress(worker=0, trial=trial, epoch=0, epochs=30, val_acc=float("nan"), best=0.5, state="STARTED"))
    assert "w0 trials 6,7,8" in screen.getvalue()
    bars(Progress(worker=0, trial=7, epoch=3, epochs=30, val_acc=0.3, best=0.5, state="PRUNED"))
    assert "w0 trials 6,8" in screen.getvalue()
    bars(Progress(worker=0, trial=6, epoch=30, epochs=30, val_acc=0.6, best=0.6, state="COMPLETE"))
    assert "w0 trial 8" in screen.getvalue() and "waiting" not in screen.getvalue()
    bars(Progress(worker=0, trial=8, epoch=30, epochs=30, val_acc=0.55, best=0.6, state="COMPLETE"))
    assert "w0 waiting for a trial" in screen.getvalue()
    bars.close()
