"""The search space: conditional and fixed parameters, the baseline's enqueue round trip, TrialParams."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import optuna
import pytest

from fer_search.config import FAMILY_RULES, PATTERNS, FloatRange, SpaceConfig
from fer_search.model import BASELINE, BLOCK_DROPOUTS, TrialParams, build_model, used_dropouts
from fer_search.space import largest_model, optuna_params, params_from_trial, suggest_params

optuna.logging.set_verbosity(optuna.logging.WARNING)

DROPOUTS = ("dropout_high", "dropout_low", "dropout_head")
SEARCHED_ALWAYS = {
    "dropout_pattern",
    "lr",
    "weight_decay",
    "batch_size",
    "linear_depth",
    "optimizer",
    "scheduler",
    "width",
    "convs_per_block",
}


def new_study(storage: str | None = None) -> optuna.Study:
    return optuna.create_study(storage=storage, direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))


def ask_params(
    space: SpaceConfig, enqueued: dict[str, Any] | None = None, study: optuna.Study | None = None
) -> tuple[optuna.Trial, TrialParams]:
    """A fresh trial (with `enqueued` fixed first when given) and what suggest_params makes of it."""
    study = study or new_study()
    if enqueued is not None:
        study.enqueue_trial(enqueued)
    trial = study.ask()
    return trial, suggest_params(trial, space)


def with_pattern(params: TrialParams, pattern: str, **rates: float | None) -> TrialParams:
    return dataclasses.replace(params, dropout_pattern=pattern, **{**dict.fromkeys(DROPOUTS), **rates})


def fixed_value(params: TrialParams, name: str) -> Any:
    """`params`' value as a fixed space entry: a float, or a one-element tuple for categoricals."""
    value = getattr(params, name)
    spec = getattr(SpaceConfig(), name)
    return (value,) if isinstance(spec, tuple) else value


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("none", ()),
        ("head", ("dropout_head",)),
        ("every", ("dropout_high", "dropout_head")),
        ("alternate", ("dropout_high", "dropout_head")),
        ("interlaced", ("dropout_high", "dropout_low", "dropout_head")),
    ],
)
def test_used_dropouts_table(pattern: str, expected: tuple[str, ...]) -> None:
    assert used_dropouts(pattern) == expected


def test_the_family_s_rules_cover_every_searched_field() -> None:
    """config checks the space, and model.check_params a model file, field by field with these rules."""
    fields = [f.name for f in dataclasses.fields(TrialParams)]
    assert list(FAMILY_RULES) == fields == [f.name for f in dataclasses.fields(SpaceConfig)]


def test_block_dropouts_cover_every_pattern_the_config_accepts() -> None:
    assert tuple(BLOCK_DROPOUTS) == PATTERNS
    assert all(len(rates) == 4 for rates in BLOCK_DROPOUTS.values())


@pytest.mark.parametrize("pattern", PATTERNS)
def test_only_used_dropouts_are_suggested(pattern: str) -> None:
    trial, params = ask_params(SpaceConfig(), {"dropout_pattern": pattern})
    used = set(used_dropouts(pattern))
    assert set(trial.params) == SEARCHED_ALWAYS | used
    assert params.dropout_pattern == pattern
    for name in DROPOUTS:
        value = getattr(params, name)
        assert (value is not None) == (name in used), name
        if value is not None:
            assert value == trial.params[name]
    build_model(params)  # the model uses exactly these rates: it raises when one it needs is None


def test_dropout_low_only_for_interlaced_and_head_for_all_but_none() -> None:
    suggested = {p: set(ask_params(SpaceConfig(), {"dropout_pattern": p})[0].params) for p in PATTERNS}
    assert [p for p in PATTERNS if "dropout_low" in suggested[p]] == ["interlaced"]
    assert [p for p in PATTERNS if "dropout_head" not in suggested[p]] == ["none"]
    assert not set(DROPOUTS) & suggested["none"]


def test_suggestions_stay_in_the_space() -> None:
    space = SpaceConfig()
    study = new_study()
    for _ in range(30):
        trial, params = ask_params(space, study=study)
        for name, spec in ((f.name, getattr(space, f.name)) for f in dataclasses.fields(space)):
            value = getattr(params, name)
            if isinstance(spec, FloatRange) and value is not None:
                assert spec.low <= value <= spec.high, name
            elif isinstance(spec, tuple):
                assert value in spec, name
        study.tell(trial, 0.0)


def test_fixed_values_are_not_suggested_but_land_in_params() -> None:
    space = dataclasses.replace(
        SpaceConfig(), lr=2e-3, batch_size=(64,), dropout_pattern=("head",), dropout_head=0.25, width=(1.5,)
    )
    trial, params = ask_params(space)
    assert not {"lr", "batch_size", "dropout_pattern", "dropout_head", "width"} & set(trial.params)
    assert set(trial.params) == SEARCHED_ALWAYS - {"lr", "batch_size", "dropout_pattern", "width"}
    assert (params.lr, params.batch_size, params.dropout_pattern, params.dropout_head, params.width) == (
        2e-3,
        64,
        "head",
        0.25,
        1.5,
    )
    assert params.dropout_high is None and params.dropout_low is None


def test_everything_fixed_suggests_nothing() -> None:
    space = SpaceConfig(**{f.name: fixed_value(BASELINE, f.name) for f in dataclasses.fields(SpaceConfig)})
    trial, params = ask_params(space)
    assert trial.params == {}
    assert params == BASELINE


def test_the_largest_model_is_the_widest_and_deepest_the_space_allows_with_the_rest_kept() -> None:
    space = SpaceConfig(width=(1.5, 0.5), convs_per_block=(1, 2), linear_depth=(2, 1))
    assert largest_model(BASELINE, space) == dataclasses.replace(BASELINE, width=1.5, convs_per_block=2)


def test_in_a_fixed_architecture_the_largest_model_is_the_trial_s_own() -> None:
    space = SpaceConfig(width=(1.0,), convs_per_block=(1,), linear_depth=(2,))
    assert largest_model(BASELINE, space) == BASELINE


ROUND_TRIP_PARAMS = {
    "baseline": BASELINE,
    "every": with_pattern(BASELINE, "every", dropout_high=0.45, dropout_head=0.3),
    "none": dataclasses.replace(
        with_pattern(BASELINE, "none"),
        optimizer="adamw",
        scheduler="cosine",
        width=2.0,
        convs_per_block=2,
        linear_depth=3,
        batch_size=512,
        lr=3e-3,
    ),
}


@pytest.mark.parametrize("name", ROUND_TRIP_PARAMS)
def test_optuna_params_round_trip_through_enqueue(name: str) -> None:
    params = ROUND_TRIP_PARAMS[name]
    enqueued = optuna_params(params, SpaceConfig())
    assert enqueued is not None
    assert set(enqueued) == SEARCHED_ALWAYS | set(used_dropouts(params.dropout_pattern))
    trial, suggested = ask_params(SpaceConfig(), enqueued)
    assert suggested == params
    assert trial.params == enqueued


def test_baseline_round_trip_through_sqlite(tmp_path: Path) -> None:
    study = new_study(f"sqlite:///{tmp_path / 'space.db'}")
    _, suggested = ask_params(SpaceConfig(), optuna_params(BASELINE, SpaceConfig()), study)
    assert suggested == BASELINE


def test_baseline_round_trip_through_fixed_trial() -> None:
    # FixedTrial raises for any parameter suggest_params asks for that optuna_params did not give.
    enqueued = optuna_params(BASELINE, SpaceConfig())
    assert suggest_params(optuna.trial.FixedTrial(enqueued), SpaceConfig()) == BASELINE


def test_optuna_params_leaves_out_fixed_values() -> None:
    space = dataclasses.replace(SpaceConfig(), lr=1e-3, batch_size=(128,), dropout_low=0.3, optimizer=("adam",))
    enqueued = optuna_params(BASELINE, space)
    assert enqueued is not None
    assert not {"lr", "batch_size", "dropout_low", "optimizer"} & set(enqueued)
    assert ask_params(space, enqueued)[1] == BASELINE


@pytest.mark.parametrize(
    "change",
    [
        {"batch_size": (64, 256)},
        {"lr": FloatRange(2e-3, 3e-3, log=True)},
        {"lr": FloatRange(1e-5, 9e-4, log=True)},
        {"lr": 2e-3},
        {"dropout_pattern": ("none", "head", "every")},
        {"dropout_low": FloatRange(0.35, 0.4)},
        {"dropout_low": 0.2},
        {"width": (0.5,)},
        {"optimizer": ("adamw",)},
        {"linear_depth": (1, 3)},
    ],
    ids=lambda change: next(iter(change)),
)
def test_optuna_params_none_when_space_excludes_the_baseline(change: dict[str, Any]) -> None:
    assert optuna_params(BASELINE, dataclasses.replace(SpaceConfig(), **change)) is None


def test_optuna_params_ignores_rates_the_pattern_does_not_use() -> None:
    params = with_pattern(BASELINE, "every", dropout_high=0.5, dropout_head=0.5)
    space = dataclasses.replace(SpaceConfig(), dropout_low=0.2)  # excludes nothing `every` uses
    assert optuna_params(params, space) is not None


def test_optuna_params_range_bounds_are_inclusive() -> None:
    space = dataclasses.replace(SpaceConfig(), lr=FloatRange(1e-3, 3e-3, log=True), weight_decay=FloatRange(1e-6, 1e-4))
    assert optuna_params(BASELINE, space) is not None


@pytest.mark.parametrize("name", ROUND_TRIP_PARAMS)
def test_trial_params_dict_round_trip(name: str) -> None:
    params = ROUND_TRIP_PARAMS[name]
    d = json.loads(json.dumps(params.to_dict()))
    assert TrialParams.from_dict(d) == params
    assert TrialParams.from_dict({**d, "seed": 7}) == params  # other user attributes are ignored
    assert params_from_trial({"trial_params": d, "seed": 7}) == params
