"""The search space: the only place that calls trial.suggest_*; config ranges -> TrialParams."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fer_search.config import FloatParam, FloatRange, SpaceConfig

if TYPE_CHECKING:  # optuna is imported only where a study runs
    import optuna


@dataclass(frozen=True)
class TrialParams:
    """One point of the family: architecture and optimisation. Unused dropout rates are None."""

    dropout_pattern: str
    dropout_high: float | None
    dropout_low: float | None
    dropout_head: float | None
    lr: float
    weight_decay: float
    batch_size: int
    linear_depth: int
    optimizer: str
    scheduler: str
    width: float
    convs_per_block: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrialParams:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: d.get(k) for k in names})


# The documented hand-tuned model ("the baseline"): trial 0 of every study.
BASELINE = TrialParams(
    dropout_pattern="interlaced", dropout_high=0.5, dropout_low=0.3, dropout_head=0.5,
    lr=1e-3, weight_decay=1e-4, batch_size=128, linear_depth=2, optimizer="adam",
    scheduler="plateau", width=1.0, convs_per_block=1,
)


# The rate after each of the four conv blocks, by dropout_pattern (None: no Dropout there); every
# pattern but "none" also puts dropout_head in the head. The model builds from this table and
# the space suggests from it, so the two cannot disagree.
BLOCK_DROPOUTS: dict[str, tuple[str | None, ...]] = {
    "none": (None,) * 4,
    "head": (None,) * 4,
    "every": ("dropout_high",) * 4,
    "alternate": ("dropout_high", None, "dropout_high", None),
    "interlaced": ("dropout_high", "dropout_low", "dropout_high", "dropout_low"),
}


def used_dropouts(pattern: str) -> tuple[str, ...]:
    """The dropout rates a pattern uses, so that only those are suggested and recorded."""
    conv = tuple(dict.fromkeys(name for name in BLOCK_DROPOUTS[pattern] if name is not None))
    return conv + (() if pattern == "none" else ("dropout_head",))


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


def params_from_trial(user_attrs: dict[str, Any]) -> TrialParams:
    """The full TrialParams a trial trained (stored whole, since fixed values are not params)."""
    return TrialParams.from_dict(user_attrs["trial_params"])
