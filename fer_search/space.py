"""The search space: search.toml's ranges onto Optuna (the only place that calls trial.suggest_*)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from fer_search.config import FloatParam, FloatRange, SpaceConfig
from fer_search.model import TrialParams, used_dropouts

if TYPE_CHECKING:  # optuna is imported only where a study runs
    import optuna


def suggest_params(trial: optuna.Trial, space: SpaceConfig) -> TrialParams:
    """Ask the trial for every searched parameter the architecture uses."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(SpaceConfig):
        if f.name.startswith("dropout_") and f.name != "dropout_pattern":
            continue
        values[f.name] = _suggest(trial, f.name, getattr(space, f.name))
    for name in ("dropout_high", "dropout_low", "dropout_head"):
        used = name in used_dropouts(values["dropout_pattern"])
        values[name] = _suggest(trial, name, getattr(space, name)) if used else None
    return TrialParams(**values)


def _suggest(trial: optuna.Trial, name: str, spec: FloatParam | tuple[Any, ...]) -> Any:
    if isinstance(spec, FloatRange):
        return trial.suggest_float(name, spec.low, spec.high, log=spec.log)
    if isinstance(spec, tuple):
        return spec[0] if len(spec) == 1 else trial.suggest_categorical(name, list(spec))
    return spec  # a fixed float


def optuna_params(params: TrialParams, space: SpaceConfig) -> dict[str, Any] | None:
    """The Optuna parameters that make a trial sample `params` (for enqueue_trial).

    None when the space cannot produce `params` (a value outside a range, a fixed value that
    differs, a missing choice).
    """
    out: dict[str, Any] = {}
    used = set(used_dropouts(params.dropout_pattern))
    for f in dataclasses.fields(SpaceConfig):
        value = getattr(params, f.name)
        spec = getattr(space, f.name)
        if f.name.startswith("dropout_") and f.name != "dropout_pattern" and f.name not in used:
            continue
        if isinstance(spec, FloatRange):
            if not spec.low <= value <= spec.high:
                return None
            out[f.name] = value
        elif isinstance(spec, tuple):
            if value not in spec:
                return None
            if len(spec) > 1:
                out[f.name] = value
        elif spec != value:
            return None
    return out


def largest_model(params: TrialParams, space: SpaceConfig) -> TrialParams:
    """`params` with the widest and deepest architecture the space allows: the slowest trial it can draw."""
    return dataclasses.replace(
        params,
        width=max(space.width),
        convs_per_block=max(space.convs_per_block),
        linear_depth=max(space.linear_depth),
    )


def params_from_trial(user_attrs: dict[str, Any]) -> TrialParams:
    """The full TrialParams a trial trained (stored whole, since fixed values are not params)."""
    return TrialParams.from_dict(user_attrs["trial_params"])
