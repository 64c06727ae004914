"""search.toml + CLI flags -> one frozen, validated Config tree."""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, get_type_hints

from fer_search.errors import UserError

PATTERNS = ("none", "head", "every", "alternate", "interlaced")
OPTIMIZERS = ("adam", "adamw")
SCHEDULERS = ("plateau", "cosine")
PRUNERS = ("percentile", "median", "hyperband", "none")
FLIPS = ("auto", "on", "off")  # finalize.flip: decided on validation, always, never

# The model family's limits, by TrialParams field. They live here, not in model.py, because the
# [space] check below needs them and status and dashboard load the config without importing torch;
# model.check_params holds a model file's params to the same rules.
MIN_WIDTH = 1 / 32  # the first block (32 channels at width 1) keeps one channel
# Twice the space's widest (2.0): the largest model, at 4 convs a block, has 46 M parameters (88 MiB
# in float16, 185 MB to build in float32); a crafted width could otherwise ask for terabytes.
MAX_WIDTH = 4.0
# Twice the space's deepest (2): 16 conv layers, VGG-19's depth, where plain conv stacks without
# residual connections stop training well.
MAX_CONVS_PER_BLOCK = 4
MAX_LINEAR_DEPTH = 3  # the output layer after up to two hidden ones (model.HEAD_WIDTHS)
# Four times the space's largest (512), and the batch validation uses: FER2013's 28,709 training
# images make 14 steps an epoch, and the widest model of the space keeps about 10 MB of
# activations an image (20 GB a batch); larger batches only run out of memory (on the CPU
# through the OOM killer, with no message).
MAX_BATCH_SIZE = 2048
DROPOUT_RATES = ("dropout_high", "dropout_low", "dropout_head")

# A rule: whether a value belongs to the family, and the rule as an error states it.
Rule = tuple[Callable[[Any], bool], str]


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    """A number that is not a bool, inf or nan (huge ints compare exactly, so they need no float())."""
    return _is_integer(value) or (isinstance(value, float) and math.isfinite(value))


def _one_of(choices: tuple[str, ...]) -> Rule:
    return (lambda v: isinstance(v, str) and v in choices, f"must be one of {', '.join(choices)}")


def _integer_in(low: int, high: int) -> Rule:
    return (lambda v: _is_integer(v) and low <= v <= high, f"must be an integer in [{low}, {high}]")


def _number_in(low: float, high: float) -> Rule:
    return (lambda v: _is_finite_number(v) and low <= v <= high, f"must be a number in [{low:g}, {high:g}]")


# Every TrialParams field, whose name is also its [space] key; model.check_params lets an unused
# dropout rate be None.
FAMILY_RULES: dict[str, Rule] = {
    "dropout_pattern": _one_of(PATTERNS),
    **dict.fromkeys(DROPOUT_RATES, (lambda v: _is_finite_number(v) and 0 <= v < 1, "must lie in [0, 1)")),
    "lr": (lambda v: _is_finite_number(v) and v > 0, "must be a finite number > 0"),
    "weight_decay": (lambda v: _is_finite_number(v) and v >= 0, "must be a finite number >= 0"),
    "batch_size": _integer_in(1, MAX_BATCH_SIZE),
    "linear_depth": _integer_in(1, MAX_LINEAR_DEPTH),
    "optimizer": _one_of(OPTIMIZERS),
    "scheduler": _one_of(SCHEDULERS),
    "width": _number_in(MIN_WIDTH, MAX_WIDTH),
    "convs_per_block": _integer_in(1, MAX_CONVS_PER_BLOCK),
}


def broken_family_rule(name: str, value: Any) -> str | None:
    """The rule of TrialParams field `name` that `value` breaks, as an error states it; None if it keeps it."""
    fits, rule = FAMILY_RULES[name]
    return None if fits(value) else rule


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
    fuse: int = 1  # trials of one architecture a worker trains as one batched model (fuse.py)
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
    # Re-ranking: the top_k trials by search score are retrained selection_seeds times and the best mean
    # validation accuracy is finalized. A search score moves by about 0.8 points from seed to seed, so
    # the runner-up of 50 is often as good as the best; 3 candidates catch most such near-ties, and 2
    # seeds halve a candidate's variance while the winner's runs serve as its first finalize seeds
    # (ARCHITECTURE.md, "What finalize writes"). 1 = the search's best, as it is.
    top_k: int = 3
    selection_seeds: int = 2
    flip: str = "auto"  # average each face with its mirror image: auto (decided on validation), on, off
    ensemble: bool = False  # ship the seeds' averaged probabilities as one model file


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


def load_config(
    path: Path | None = None, overrides: dict[str, Any] | None = None, override_origins: dict[str, str] | None = None
) -> Config:
    """Read `path` (or ./search.toml when it exists, else the defaults), then apply overrides.

    Overrides are keyed "section.key" and hold already-typed values from the CLI; relative paths
    in them are taken against the working directory, relative paths in the file against its folder.
    `override_origins` names where an override came from, for its errors (an environment variable); the
    default is the command line.
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
        origin = (override_origins or {}).get(key, "command line")
        parsed = _parse_section(name, {sub: value}, Path.cwd(), origin)
        sections[name] = {**sections.get(name, {}), **parsed}
        origins[key] = origin
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
        if isinstance(value, float) and not math.isfinite(value):  # TOML and click read inf and nan; no key means them
            raise UserError(f"{label}: expected a finite number")
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
    "run.trials": 1, "run.epochs": 1, "run.workers": 1, "run.fuse": 1, "run.heartbeat_interval": 1,
    "run.grace_period": 1, "run.timeout": 0, "run.max_retry": 0, "run.checkpoint_every_s": 0, "run.ready_timeout_s": 0,
    "run.seed": 0, "data.split_seed": 0,
    "pruner.startup_trials": 0, "pruner.warmup_epochs": 0, "pruner.patience": 0, "pruner.min_epochs": 1,
    "pruner.reduction_factor": 2, "pruner.min_delta": 0, "finalize.seeds": 1, "finalize.epochs": 0, "finalize.jobs": 1,
    "finalize.top_k": 1, "finalize.selection_seeds": 1,
}
# fmt: on

# Every duration in seconds. time.sleep and thread waits (Optuna's heartbeat thread among them)
# raise OverflowError past threading.TIMEOUT_MAX (292 years); a year is more than any wait needs.
MAX_SECONDS = 365 * 24 * 3600
# numpy refuses seeds outside 0 .. 2**32 - 1 (data.split_seed seeds its generator) and torch.manual_seed
# those beyond 2**64 - 1 (`--seed 10**30`); run.seed keeps numpy's range too, one rule for both.
MAX_SEED = 2**32 - 1
# Each local worker is a spawned process (torch and the data set: about half a GB) with up to three
# storage connections (storage.PG_POOL_SIZE): 32 stay within PostgreSQL's default
# max_connections (100), and already exceed the cores of most single machines.
MAX_WORKERS = 32
# A fused group holds a copy of the training images per member (28,709 x 48 x 48 bytes: 66 MB for
# FER2013's, so 2.1 GB for 32) and its members' weights, optimizer states and activations at once;
# as --workers, 32 is far past what one device shares well.
MAX_FUSE = 32

# Numeric keys and their greatest allowed value, where a greater one would break something.
# fmt: off
AT_MOST: dict[str, float] = {
    "run.timeout": MAX_SECONDS, "run.heartbeat_interval": MAX_SECONDS, "run.grace_period": MAX_SECONDS,
    "run.checkpoint_every_s": MAX_SECONDS, "run.ready_timeout_s": MAX_SECONDS, "run.wait_poll_s": MAX_SECONDS,
    "run.seed": MAX_SEED, "data.split_seed": MAX_SEED, "run.workers": MAX_WORKERS, "run.fuse": MAX_FUSE,
}
# fmt: on

# A study name names a folder (studies/<name>/final) and a row in Optuna's 512-character
# study_name column, so it must be a safe file name on every system: no separators, '..' or control
# characters, no leading '.' or '-' (hidden files, options), no space at either end, and short.
# Spaces and any script's letters stay allowed: studies made before this rule must stay reachable.
STUDY_NAME_LENGTH = 100
STUDY_NAME_RULE = (
    f"must be 1 to {STUDY_NAME_LENGTH} printable characters without '/', '\\' or '..', "
    "not starting with '.' or '-', nor starting or ending with a space"
)


def _check_consistency(config: Config, origins: dict[str, str]) -> None:
    """Value checks that types alone cannot make; each names where the value came from, the key and the value."""

    def where(key: str) -> str:
        return origins.get(key, "defaults")

    def fail(key: str, problem: str) -> NoReturn:
        raise UserError(f"{where(key)}: {key} = {_show(_value(config, key))}: {problem}")

    for f in dataclasses.fields(SpaceConfig):
        for v in _space_values(getattr(config.space, f.name)):
            rule = broken_family_rule(f.name, v)
            if rule is not None:
                fail(f"space.{f.name}", f"{v!r} {rule}")
    for key, least in AT_LEAST.items():
        if _value(config, key) < least:
            fail(key, f"must be >= {least}")
    for key, most in AT_MOST.items():
        if _value(config, key) > most:
            fail(key, f"must be <= {most}")
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
    if config.finalize.flip not in FLIPS:
        fail("finalize.flip", f"not one of {', '.join(FLIPS)}")
    if not is_device_name(r.device):
        fail("run.device", "not auto, cpu, cuda or cuda:K")
    if not is_study_name(config.study.name):
        fail("study.name", STUDY_NAME_RULE)


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


def _space_values(spec: FloatParam | tuple[Any, ...]) -> tuple[Any, ...]:
    """What the family's rules must hold for in a [space] entry: a range's ends, each choice, a fixed value."""
    if isinstance(spec, FloatRange):
        return (spec.low, spec.high)
    return spec if isinstance(spec, tuple) else (spec,)


def is_study_name(name: str) -> bool:
    """Whether `name` keeps STUDY_NAME_RULE."""
    return (
        0 < len(name) <= STUDY_NAME_LENGTH
        and name.isprintable()
        and not any(bad in name for bad in ("/", "\\", ".."))
        and not name.startswith((".", "-"))
        and name == name.strip()
    )


def is_device_name(name: str) -> bool:
    if name in ("auto", "cpu", "cuda"):
        return True
    head, _, index = name.partition(":")
    return head == "cuda" and index.isdigit()
