"""search.toml + CLI flags -> one frozen, validated Config tree."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, get_type_hints

from fer_search.errors import UserError

PATTERNS = ("none", "head", "every", "alternate", "interlaced")
OPTIMIZERS = ("adam", "adamw")
SCHEDULERS = ("plateau", "cosine")
PRUNERS = ("percentile", "median", "hyperband", "none")


@dataclass(frozen=True)
class FloatRange:
    """A float searched between low and high (log-uniformly when log)."""

    low: float
    high: float
    log: bool = False


# A float parameter is a range to search or one fixed value; a categorical one is a tuple of
# choices (one choice = fixed).
FloatParam = FloatRange | float


@dataclass(frozen=True)
class SpaceConfig:
    """The search space: what each TrialParams field may take (ARCHITECTURE.md, "The search")."""

    dropout_pattern: tuple[str, ...] = PATTERNS
    dropout_high: FloatParam = FloatRange(0.3, 0.6)
    dropout_low: FloatParam = FloatRange(0.1, 0.4)
    dropout_head: FloatParam = FloatRange(0.2, 0.6)
    lr: FloatParam = FloatRange(1e-4, 3e-3, log=True)
    weight_decay: FloatParam = FloatRange(1e-6, 1e-3, log=True)
    batch_size: tuple[int, ...] = (32, 64, 128, 256, 512)
    linear_depth: tuple[int, ...] = (1, 2, 3)
    optimizer: tuple[str, ...] = OPTIMIZERS
    scheduler: tuple[str, ...] = SCHEDULERS
    width: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0)
    convs_per_block: tuple[int, ...] = (1, 2)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form, stored in the study to detect a changed space."""
        return {
            k: dataclasses.asdict(v) if isinstance(v, FloatRange) else (list(v) if isinstance(v, tuple) else v)
            for k, v in ((f.name, getattr(self, f.name)) for f in dataclasses.fields(self))
        }


@dataclass(frozen=True)
class DataConfig:
    path: Path = Path("data/fer2013")
    cache_dir: Path = Path("studies/cache")
    val_fraction: float = 0.1  # used only where the source has no PublicTest names
    split_seed: int = 0


@dataclass(frozen=True)
class StudyConfig:
    name: str = "fer2013"
    storage: str = "sqlite:///studies/fer2013.db"
    artifacts: Path = Path("studies/artifacts")
    dir: Path = Path("studies")  # studies/<name>/final and other per-study files


@dataclass(frozen=True)
class RunConfig:
    trials: int = 50
    epochs: int = 30
    device: str = "auto"
    workers: int = 1
    seed: int = 0
    timeout: float = 0.0  # seconds; 0 = no limit
    ignore_mismatch: bool = False
    heartbeat_interval: int = 20
    grace_period: int = 120
    max_retry: int = 3
    checkpoint_every_s: float = 60.0
    ready_timeout_s: float = 60.0
    wait_poll_s: float = 5.0


@dataclass(frozen=True)
class PrunerConfig:
    # Keep the best third at each epoch from the third on: a 30-epoch study then trains well
    # under half the epochs of an unpruned one (the median pruner, warm-up 5: half; BENCHMARKS.md).
    kind: str = "percentile"
    percentile: float = 33.0  # percentile: trials in this top percent at an epoch go on (median = 50)
    startup_trials: int = 5
    warmup_epochs: int = 3
    patience: int = 0  # > 0 wraps the pruner in Optuna's PatientPruner
    min_delta: float = 0.0
    min_epochs: int = 2  # Hyperband's min_resource
    reduction_factor: int = 3


@dataclass(frozen=True)
class FinalizeConfig:
    seeds: int = 3
    baseline: bool = True
    epochs: int = 0  # 0 = the study's epochs
    out: Path | None = None  # None = <study dir>/<study>/final
    jobs: int = 1  # seed runs trained at once, each in its own process sharing the device; 1 = in this process


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    run: RunConfig = field(default_factory=RunConfig)
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    space: SpaceConfig = field(default_factory=SpaceConfig)
    finalize: FinalizeConfig = field(default_factory=FinalizeConfig)

    @property
    def final_dir(self) -> Path:
        return self.finalize.out or self.study.dir / self.study.name / "final"


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read `path` (or ./search.toml when it exists, else the defaults), then apply overrides.

    Overrides are keyed "section.key" and hold already-typed values from the CLI; relative paths
    in them are taken against the working directory, relative paths in the file against its folder.
    """
    if path is None and Path("search.toml").is_file():
        path = Path("search.toml")
    raw: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        try:
            raw = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not valid TOML: {e}") from None
        base = path.resolve().parent
    where = str(path) if path else "defaults"
    sections: dict[str, Any] = {}
    # "section.key" -> where its value came from, so that a value check made after the merge can
    # send the user to the file or the flag; a key in neither has its built-in default.
    origins: dict[str, str] = {}
    for name, table in raw.items():
        if name not in SECTIONS:
            raise UserError(f"{where}: unknown section [{name}] (known: {', '.join(SECTIONS)})")
        if not isinstance(table, dict):
            raise UserError(f"{where}: [{name}] must be a table")
        sections[name] = _parse_section(name, table, base, where)
        origins.update(dict.fromkeys((f"{name}.{key}" for key in table), where))
    for key, value in (overrides or {}).items():
        name, _, sub = key.partition(".")
        parsed = _parse_section(name, {sub: value}, Path.cwd(), "command line")
        sections[name] = {**sections.get(name, {}), **parsed}
        origins[key] = "command line"
    config = Config(**{name: SECTIONS[name](**values) for name, values in sections.items()})
    config = _resolve_defaults(config, base)
    _check_consistency(config, origins)
    return config


def _resolve_defaults(config: Config, base: Path) -> Config:
    """Make every default relative path absolute against the config's folder."""
    data = dataclasses.replace(
        config.data, path=_absolute(config.data.path, base), cache_dir=_absolute(config.data.cache_dir, base)
    )
    study = dataclasses.replace(
        config.study,
        storage=absolute_sqlite_url(config.study.storage, base),
        artifacts=_absolute(config.study.artifacts, base),
        dir=_absolute(config.study.dir, base),
    )
    fin = config.finalize
    if fin.out is not None:
        fin = dataclasses.replace(fin, out=_absolute(fin.out, base))
    return dataclasses.replace(config, data=data, study=study, finalize=fin)


def _absolute(p: Path, base: Path) -> Path:
    return p if p.is_absolute() else (base / p)


def absolute_sqlite_url(url: str, base: Path) -> str:
    """sqlite:///rel/path.db -> sqlite:////abs/path.db; other URLs unchanged."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and url != prefix + ":memory:":
        return prefix + str(base / url[len(prefix) :])
    return url


def _parse_section(name: str, table: dict[str, Any], base: Path, where: str) -> dict[str, Any]:
    cls = SECTIONS.get(name)
    if cls is None:
        raise UserError(f"{where}: unknown section [{name}]")
    hints = get_type_hints(cls)
    out: dict[str, Any] = {}
    for key, value in table.items():
        label = f"{where}: {name}.{key} = {value!r}"
        if key not in hints:
            raise UserError(f"{label}: unknown key (known: {', '.join(hints)})")
        if name == "space":
            out[key] = _parse_space_value(key, value, hints[key], label)
        else:
            out[key] = _parse_scalar(value, hints[key], base, label)
    return out


def _parse_scalar(value: Any, hint: Any, base: Path, label: str) -> Any:
    if hint is bool:
        if not isinstance(value, bool):
            raise UserError(f"{label}: expected true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{label}: expected an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{label}: expected a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise UserError(f"{label}: expected a string")
        return value
    if hint in (Path, Path | None):
        if not isinstance(value, (str, Path)) or str(value) == "":
            raise UserError(f"{label}: expected a path")
        return _absolute(Path(value).expanduser(), base)
    raise AssertionError(f"unhandled type {hint}")


def _parse_space_value(key: str, value: Any, hint: Any, label: str) -> Any:
    if hint == FloatParam:
        if isinstance(value, dict):
            unknown = set(value) - {"low", "high", "log"}
            if unknown or not {"low", "high"} <= set(value):
                raise UserError(f"{label}: a range is {{low = ..., high = ..., log = false}}")
            low = _parse_scalar(value["low"], float, Path(), label)
            high = _parse_scalar(value["high"], float, Path(), label)
            log = _parse_scalar(value.get("log", False), bool, Path(), label)
            if low > high:
                raise UserError(f"{label}: low {low} is above high {high}")
            if log and low <= 0:
                raise UserError(f"{label}: a log range needs low > 0")
            return FloatRange(low, high, log)
        return _parse_scalar(value, float, Path(), label)
    item_type = get_type_hints(SpaceConfig)[key].__args__[0]
    items = value if isinstance(value, list) else [value]
    if not items:
        raise UserError(f"{label}: needs at least one value")
    parsed = tuple(_parse_scalar(v, item_type, Path(), label) for v in items)
    if len(set(parsed)) != len(parsed):
        raise UserError(f"{label}: repeated values")
    return parsed


# Numeric keys and their least allowed value (checked after the merge, as types cannot say it).
# A table: a few keys a line reads better than one key a line.
# fmt: off
AT_LEAST: dict[str, float] = {
    "run.trials": 1, "run.epochs": 1, "run.workers": 1, "run.heartbeat_interval": 1, "run.grace_period": 1,
    "run.timeout": 0, "run.max_retry": 0, "run.checkpoint_every_s": 0, "run.ready_timeout_s": 0,
    "pruner.startup_trials": 0, "pruner.warmup_epochs": 0, "pruner.patience": 0, "pruner.min_epochs": 1,
    "pruner.reduction_factor": 2, "finalize.seeds": 1, "finalize.epochs": 0, "finalize.jobs": 1,
}
# fmt: on


def _check_consistency(config: Config, origins: dict[str, str]) -> None:
    """Value checks that types alone cannot make; each names where the value came from, the key and the value."""

    def where(key: str) -> str:
        return origins.get(key, "defaults")

    def fail(key: str, problem: str) -> NoReturn:
        raise UserError(f"{where(key)}: {key} = {_show(_value(config, key))}: {problem}")

    s = config.space
    allowed = {"dropout_pattern": PATTERNS, "optimizer": OPTIMIZERS, "scheduler": SCHEDULERS, "linear_depth": (1, 2, 3)}
    for key, choices in allowed.items():
        for v in getattr(s, key):
            if v not in choices:
                fail(f"space.{key}", f"{v!r} is not one of {', '.join(map(str, choices))}")
    for key in ("batch_size", "convs_per_block"):
        if any(v < 1 for v in getattr(s, key)):
            fail(f"space.{key}", "values must be >= 1")
    if any(v <= 0 for v in s.width):
        fail("space.width", "values must be > 0")
    for key in ("dropout_high", "dropout_low", "dropout_head"):
        low, high = _bounds(getattr(s, key))
        if low < 0 or high >= 1:
            fail(f"space.{key}", "dropout must lie in [0, 1)")
    for key in ("lr", "weight_decay"):
        low, _ = _bounds(getattr(s, key))
        if low < 0 or (key == "lr" and low == 0):
            fail(f"space.{key}", f"must be {'> 0' if key == 'lr' else '>= 0'}")
    for key, least in AT_LEAST.items():
        if _value(config, key) < least:
            fail(key, f"must be >= {least}")
    r = config.run
    if r.wait_poll_s <= 0:  # time.sleep refuses a negative; 0 would spin on the database
        fail("run.wait_poll_s", "must be > 0")
    if r.grace_period <= r.heartbeat_interval:
        fail(
            "run.grace_period",
            f"must exceed run.heartbeat_interval = {r.heartbeat_interval} ({where('run.heartbeat_interval')})",
        )
    if config.pruner.kind not in PRUNERS:
        fail("pruner.kind", f"not one of {', '.join(PRUNERS)}")
    if not 0 < config.pruner.percentile < 100:
        fail("pruner.percentile", "must lie in (0, 100)")
    if not 0 < config.data.val_fraction < 1:
        fail("data.val_fraction", "must lie in (0, 1)")
    if not is_device_name(r.device):
        fail("run.device", "not auto, cpu, cuda or cuda:K")
    if not config.study.name or "/" in config.study.name:
        fail("study.name", "must be a non-empty name without '/'")


def _value(config: Config, key: str) -> Any:
    section, _, name = key.partition(".")
    return getattr(getattr(config, section), name)


def _show(value: Any) -> str:
    """A value as the parse errors show the file's: lists for choices, a dict for a range."""
    if isinstance(value, tuple):
        return repr(list(value))
    if isinstance(value, FloatRange):
        return repr(dataclasses.asdict(value))
    return repr(value)


def _bounds(p: FloatParam) -> tuple[float, float]:
    return (p.low, p.high) if isinstance(p, FloatRange) else (p, p)


def is_device_name(name: str) -> bool:
    if name in ("auto", "cpu", "cuda"):
        return True
    head, _, index = name.partition(":")
    return head == "cuda" and index.isdigit()
