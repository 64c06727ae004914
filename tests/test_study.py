"""study: the mismatch check, the baseline's place, the configured sampler and pruner."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from searching import cli, finished, load, write_config

from fer_search import study as study_module
from fer_search.cli import main
from fer_search.config import PrunerConfig


def test_changed_epochs_or_space_refused_unless_ignored(tmp_path: Path, tiny_fer: Path) -> None:
    config = write_config(tmp_path, tiny_fer)
    assert cli("run", "--config", config, "--trials", 1, "--epochs", 1, "--device", "cpu").exit_code == 0
    changed = CliRunner().invoke(main, ["run", "--config", str(config), "--trials", "2", "--epochs", "2"])
    assert changed.exit_code == 2 and "epochs (1 -> 2)" in changed.output and "--ignore-mismatch" in changed.output
    write_config(tmp_path, tiny_fer, "[space]\nwidth = [0.5, 1.0]\n")
    choices = CliRunner().invoke(
        main, ["run", "--config", str(config), "--trials", "2", "--epochs", "1", "--ignore-mismatch"]
    )
    assert choices.exit_code == 2 and "space.width" in choices.output  # Optuna cannot change choices
    write_config(tmp_path, tiny_fer, "[space]\nlr = {low = 1e-4, high = 3e-3, log = false}\n")
    log_scale = CliRunner().invoke(
        main, ["run", "--config", str(config), "--trials", "2", "--epochs", "1", "--ignore-mismatch"]
    )
    assert log_scale.exit_code == 2 and "space.lr" in log_scale.output and "log scale" in log_scale.output
    write_config(tmp_path, tiny_fer, "[space]\nlr = {low = 1e-4, high = 1e-2, log = true}\n")
    space = CliRunner().invoke(main, ["run", "--config", str(config), "--trials", "2", "--epochs", "1"])
    assert space.exit_code == 2 and "space.lr" in space.output
    ok = cli("run", "--config", config, "--trials", 2, "--epochs", 1, "--device", "cpu", "--ignore-mismatch")
    assert ok.exit_code == 0 and len(finished(load(tmp_path))) == 2


def test_baseline_outside_the_space_is_not_enqueued(tmp_path: Path, tiny_fer: Path) -> None:
    config = write_config(tmp_path, tiny_fer, "[space]\nbatch_size = [32, 64]\n")
    result = cli("run", "--config", config, "--trials", 1, "--epochs", 1, "--device", "cpu")
    assert result.exit_code == 0
    study = load(tmp_path)
    assert study.user_attrs["baseline_excluded"] is True
    assert not any(t.user_attrs.get("baseline") for t in study.trials)
    assert "excludes" in cli("status", "--config", config).output


@pytest.mark.parametrize(
    "kind, patience, expected",
    [
        ("percentile", 0, optuna.pruners.PercentilePruner),
        ("median", 0, optuna.pruners.PercentilePruner),
        ("hyperband", 0, optuna.pruners.HyperbandPruner),
        ("none", 0, optuna.pruners.NopPruner),
        ("median", 3, optuna.pruners.PatientPruner),
        ("hyperband", 2, optuna.pruners.PatientPruner),
    ],
)
def test_the_pruner_is_the_one_configured(kind: str, patience: int, expected: type) -> None:
    config = PrunerConfig(kind=kind, patience=patience)
    assert type(study_module.make_pruner(config, epochs=30)) is expected


def draws(sampler: optuna.samplers.BaseSampler) -> list[float]:
    study = optuna.create_study(sampler=sampler)
    return [study.ask().suggest_float("x", 0, 1) for _ in range(3)]


def test_samplers_of_different_workers_and_later_runs_draw_differently() -> None:
    first = draws(study_module.make_sampler(0, worker_index=0, trials_so_far=1))
    assert draws(study_module.make_sampler(0, worker_index=1, trials_so_far=1)) != first
    assert draws(study_module.make_sampler(0, worker_index=0, trials_so_far=3)) != first  # a re-run
    assert draws(study_module.make_sampler(0, worker_index=0, trials_so_far=1)) == first  # seeded: reproducible


@pytest.mark.parametrize("kind, pruned", [("median", False), ("percentile", True)])
def test_the_percentile_pruner_keeps_the_best_third_and_the_median_half(kind: str, pruned: bool) -> None:
    study = optuna.create_study(
        direction="maximize", pruner=study_module.make_pruner(PrunerConfig(kind=kind), epochs=30)
    )
    for value in (0.1, 0.2, 0.3, 0.4, 0.5):
        study.add_trial(
            optuna.create_trial(
                value=value, params={}, distributions={}, intermediate_values={e: value for e in range(1, 4)}
            )
        )
    trial = study.ask()
    for epoch in (1, 2, 3):  # 0.35: above the median (0.3), below the best third (above 0.37)
        trial.report(0.35, epoch)
    assert bool(trial.should_prune()) is pruned
