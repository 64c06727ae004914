"""The fer-search command line: parses, calls one function, prints; user errors exit 2."""

from __future__ import annotations

import errno
import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from fer_search.errors import LEVELS, Crashed, UserError, configure_logging, logging_to
from fer_search.processes import Terminated, exit_code, signals_deferred, signals_interrupt
from fer_search.progress import accuracy_text, params_text


class _Cli(click.Group):
    """Turns a user's mistake into one line and exit 2, a crash told above into one line and exit 1, and
    Ctrl-C or SIGTERM into exit 130 or 143, everywhere."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with signals_interrupt():
                return super().invoke(ctx)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(2)
        except Crashed as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt as e:
            click.echo(f"\n{_interrupted(e)}", err=True)
            ctx.exit(exit_code(e))


def _say(text: str, nl: bool = True) -> None:
    """`text` on stdout. A full disk behind it is one line and exit 2; a closed pipe (`| head`) stays
    click's quiet exit 1."""
    try:
        click.echo(text, nl=nl)
    except OSError as error:
        if error.errno == errno.EPIPE:
            raise
        raise UserError(f"standard output: cannot write ({error.strerror or type(error).__name__})") from None


def _interrupted(interrupt: KeyboardInterrupt) -> str:
    return "terminated" if isinstance(interrupt, Terminated) else "interrupted"


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fer-search")
def main() -> None:
    """Hyperparameter search for facial-expression recognition on FER2013."""
    configure_logging()


# The config keys of the options a user may set per machine in the environment, a flag winning over it.
ENV_KEYS = {"study": "study.name", "storage": "study.storage", "data": "data.path", "device": "run.device"}
ENV_KEYS |= {"workers": "run.workers", "artifacts": "study.artifacts"}


def _config(config: Path | None, **overrides: Any) -> Any:
    from fer_search.config import load_config

    ctx = click.get_current_context()
    from_env = {p.name: _env_name(p) for p in ctx.command.params if _source(ctx, p) == ParameterSource.ENVIRONMENT}
    if config is not None and "config" in from_env and not config.is_file():
        raise UserError(f"{from_env['config']}={config}: no such config file")
    origins = {ENV_KEYS[name]: env for name, env in from_env.items() if name in ENV_KEYS}
    return load_config(config, {k: v for k, v in overrides.items() if v is not None}, origins)


def _source(ctx: click.Context, param: click.Parameter) -> ParameterSource | None:
    return ctx.get_parameter_source(param.name or "")


def _env_name(param: click.Parameter) -> str:
    return param.envvar if isinstance(param.envvar, str) else "the environment"


def _env_option(flag: str, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A flag that a machine may set once in its environment, as FER_SEARCH_<NAME>; the flag wins."""
    return click.option(flag, envvar=f"FER_SEARCH_{flag.lstrip('-').upper()}", show_envvar=True, **kwargs)


config_option = _env_option(
    "--config", type=click.Path(path_type=Path), help="search.toml to read (default ./search.toml, if there is one)"
)
study_option = _env_option("--study", help="study name (study.name)")
storage_option = _env_option(
    "--storage",
    help="storage URL, e.g. sqlite:///studies/fer2013.db or postgresql+psycopg://user@host/db (password: PGPASSWORD)",
)
data_option = _env_option("--data", type=click.Path(path_type=Path), help="FER2013 folder or fer2013.csv (data.path)")
device_option = _env_option("--device", help="auto, cpu, cuda or cuda:K")
artifacts_option = _env_option(
    "--artifacts",
    type=click.Path(path_type=Path),
    help="artifact store folder, shared by all workers (study.artifacts)",
)


def verbosity_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """-q / -v: warnings only, or every epoch too; a line per trial (or per finalize epoch) by default."""
    command = click.option("-v", "--verbose", is_flag=True, help="log every epoch too")(command)
    return click.option("-q", "--quiet", is_flag=True, help="log warnings and errors only")(command)


def _set_verbosity(quiet: bool, verbose: bool) -> None:
    if quiet and verbose:
        raise UserError("-q and -v: give one of them, not both")
    configure_logging(LEVELS[verbose - quiet])


@main.command()
@click.option("--trials", type=int, help="the study's total of finished trials, across all workers")
@study_option
@storage_option
@artifacts_option
@data_option
@config_option
@click.option("--epochs", type=int, help="most epochs per trial (stored in the study)")
@device_option
@_env_option("--workers", type=int, help="worker processes on this machine")
@click.option("--fuse", type=int, help="train this many trials of one architecture as one batched model (GPU)")
@click.option("--seed", type=int, help="base random seed")
@click.option("--timeout", type=float, help="stop taking trials after this many seconds")
@click.option(
    "--ignore-mismatch", is_flag=True, default=None, help="continue a study whose data, space or epochs changed"
)
@verbosity_options
def run(
    trials: int | None,
    study: str | None,
    storage: str | None,
    artifacts: Path | None,
    data: Path | None,
    config: Path | None,
    epochs: int | None,
    device: str | None,
    workers: int | None,
    fuse: int | None,
    seed: int | None,
    timeout: float | None,
    ignore_mismatch: bool | None,
    quiet: bool,
    verbose: bool,
) -> None:
    """Search until the study holds --trials finished trials; a log line for each trial that starts or ends."""
    _set_verbosity(quiet, verbose)
    with signals_deferred():  # torch's import cannot be interrupted cleanly
        from fer_search.progress import SearchBars
        from fer_search.search import run_search

    cfg = _config(
        config,
        **{
            "run.trials": trials,
            "study.name": study,
            "study.storage": storage,
            "study.artifacts": artifacts,
            "data.path": data,
            "run.epochs": epochs,
            "run.device": device,
            "run.workers": workers,
            "run.fuse": fuse,
            "run.seed": seed,
            "run.timeout": timeout,
            "run.ignore_mismatch": ignore_mismatch,
        },
    )
    bars = SearchBars() if sys.stderr.isatty() else None  # elsewhere (a file, docker logs): the log lines alone
    try:
        with logging_to(bars):
            outcome = run_search(cfg, bars, command_line(click.get_current_context()))
    except KeyboardInterrupt as e:
        click.echo(
            # Not "queued again": a worker killed at the end (above, if so) left its trial to be retried as stale.
            f"\n{_interrupted(e)}: the study is saved; each interrupted trial continues from its last checkpoint, "
            f"if it wrote one, in the next run (a killed worker's, once its heartbeat is a grace period old)."
            f"\nresume with: {command_line(click.get_current_context())}",
            err=True,
        )
        sys.exit(exit_code(e))
    finally:
        if bars is not None:
            bars.close()
    if outcome.timed_out:
        click.echo(f"timeout reached after {cfg.run.timeout:g} s: stopped taking trials", err=True)
    _print_status(outcome.status)


def command_line(ctx: click.Context) -> str:
    """The command as the user could type it again (from the parsed options; passwords hidden).

    Options taken from the environment are left out: the environment gives them again, and the command
    line must not show a storage URL the user kept out of it.
    """
    words = ["fer-search", *ctx.command_path.split()[1:]]  # the same program however it was started
    for param in ctx.command.params:
        value = ctx.params.get(param.name or "")
        if not isinstance(param, click.Option) or value is None or value is False or value == param.default:
            continue
        if _source(ctx, param) == ParameterSource.ENVIRONMENT:
            continue
        if param.name == "storage":
            from fer_search.storage import redacted

            value = redacted(str(value))
        words += [param.opts[-1]] if param.is_flag else [param.opts[-1], str(value)]
    return shlex.join(words)


@main.command()
@study_option
@storage_option
@config_option
@click.option("--json", "as_json", is_flag=True, help="one JSON document on stdout")
def status(study: str | None, storage: str | None, config: Path | None, as_json: bool) -> None:
    """The study at a glance: trials by state, best so far, baseline."""
    from fer_search.status import study_status
    from fer_search.storage import load_existing_study

    cfg = _config(config, **{"study.name": study, "study.storage": storage})
    doc = study_status(load_existing_study(cfg.study.storage, cfg.study.name))
    if as_json:
        _say(json.dumps(doc, indent=2))
    else:
        _print_status(doc)


def _print_status(doc: dict[str, Any]) -> None:
    running = f" ({doc['running_seconds'] / 60:.1f} in running trials)" if doc.get("running_seconds") else ""
    _say(
        f"study {doc['study']}: {_trial_counts(doc) or 'no trials'}; {doc['seconds'] / 60:.1f} min of training{running}"
    )
    best, base = doc["best"], doc["baseline"]
    if best:
        _say(f"best: trial {best['number']}, val_acc {accuracy_text(best['value'])}")
        _say("  " + params_text(best["params"]))  # as the log lines give them
    if base:
        _say(f"baseline: trial {base['number']} ({base['state'].lower()}), val_acc {accuracy_text(base['value'])}")
    elif doc.get("baseline_excluded"):
        _say("baseline: not in this study ([space] excludes one of its values)")


def _trial_counts(doc: dict[str, Any]) -> str:
    return ", ".join(f"{n.lower()} {c}" for n, c in doc["trials"].items() if c)


@main.command()
@storage_option
@artifacts_option
@click.option("--host", default="127.0.0.1", show_default=True)
# Not 0 ("any free port"): optuna-dashboard would not say which one it took.
@click.option("--port", default=8080, show_default=True, type=click.IntRange(1, 65535))
@config_option
def dashboard(storage: str | None, artifacts: Path | None, host: str, port: int, config: Path | None) -> None:
    """optuna-dashboard on the study's storage and artifact store."""
    from fer_search.storage import serve_dashboard

    cfg = _config(config, **{"study.storage": storage, "study.artifacts": artifacts})
    if host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(
            f"warning: serving on {host}: optuna-dashboard has no authentication and anyone who can "
            "reach it can delete studies",
            err=True,
        )
    serve_dashboard(cfg.study.storage, cfg.study.artifacts, host, port, _print_line)


@main.command()
@study_option
@storage_option
@artifacts_option
@data_option
@config_option
@click.option("--epochs", type=int, help="epochs per retraining (default: the study's)")
@click.option("--seeds", type=int, help="seeds per configuration")
@click.option("--no-baseline", is_flag=True, default=None, help="do not retrain the baseline")
@device_option
@click.option("--out", type=click.Path(path_type=Path), help="output folder (default studies/<study>/final)")
@click.option("--jobs", type=int, help="seed runs trained at once, in as many processes sharing the device")
@click.option("--top-k", type=int, help="re-rank the K best trials by retrained validation accuracy (1: no re-ranking)")
@click.option("--selection-seeds", type=int, help="retrainings of each re-ranked trial")
@click.option("--flip", help="average each face with its mirror image: auto (decided on validation), on or off")
@click.option("--ensemble", is_flag=True, default=None, help="ship the seeds' averaged probabilities as one model")
@verbosity_options
def finalize(
    study: str | None,
    storage: str | None,
    artifacts: Path | None,
    data: Path | None,
    config: Path | None,
    epochs: int | None,
    seeds: int | None,
    no_baseline: bool | None,
    device: str | None,
    out: Path | None,
    jobs: int | None,
    top_k: int | None,
    selection_seeds: int | None,
    flip: str | None,
    ensemble: bool | None,
    quiet: bool,
    verbose: bool,
) -> None:
    """Re-rank the top trials, retrain the best and the baseline, evaluate on the test set, write the reports."""
    _set_verbosity(quiet, verbose)
    with signals_deferred():  # torch's import cannot be interrupted cleanly
        from fer_search.finalize import finalize_study
        from fer_search.progress import FinalizeProgress

    cfg = _config(
        config,
        **{
            "study.name": study,
            "study.storage": storage,
            "study.artifacts": artifacts,
            "data.path": data,
            "finalize.epochs": epochs,
            "finalize.seeds": seeds,
            "run.device": device,
            "finalize.out": out,
            "finalize.baseline": None if no_baseline is None else not no_baseline,
            "finalize.jobs": jobs,
            "finalize.top_k": top_k,
            "finalize.selection_seeds": selection_seeds,
            "finalize.flip": flip,
            "finalize.ensemble": ensemble,
        },
    )
    shown = FinalizeProgress(bar=sys.stderr.isatty())
    try:
        with logging_to(shown.write_line if sys.stderr.isatty() else None):
            summary = finalize_study(cfg, command_line(click.get_current_context()), shown)
    finally:
        shown.close()
    _say(summary)


def _print_line(text: str) -> None:
    click.echo(text, err=True)


@main.command()
@click.option("--model", type=click.Path(path_type=Path), help="a model.pt written by finalize")
@study_option
@config_option
@click.option("--json", "as_json", is_flag=True, help="JSON Lines on stdout")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
def predict(
    model: Path | None, study: str | None, config: Path | None, as_json: bool, images: tuple[Path, ...]
) -> None:
    """Expression and probabilities for each IMAGE."""
    with signals_deferred():  # torch's import cannot be interrupted cleanly
        from fer_search.predict import load_model, predict_images

    if model is None:
        cfg = _config(config, **{"study.name": study})
        model = cfg.final_dir / "model.pt"
        if not model.is_file():
            raise UserError(f"no finalized model at {model}: run `fer-search finalize --study {cfg.study.name}` first")
    loaded = load_model(model)
    for p in predict_images(loaded, list(images)):
        if as_json:
            _say(json.dumps({"path": str(p.path), "label": p.label, "probs": p.probs}))
        else:
            top = ", ".join(f"{c} {v:.2f}" for c, v in sorted(p.probs.items(), key=lambda kv: -kv[1])[:3])
            _say(f"{p.path}: {p.label}  ({top})")


@main.group()
def data() -> None:
    """Inspect data sets."""


@data.command("check")
@click.argument("path", type=click.Path(path_type=Path))
@config_option
@click.option("--json", "as_json", is_flag=True, help="one JSON document on stdout")
def data_check(path: Path, config: Path | None, as_json: bool) -> None:
    """What a data set holds: splits, classes, counts, fingerprint."""
    with signals_deferred():  # torch's import cannot be interrupted cleanly
        from fer_search.data import CLASSES, check_data

    cfg = _config(config)
    doc = check_data(path, cfg.data.cache_dir, val_fraction=cfg.data.val_fraction, split_seed=cfg.data.split_seed)
    if as_json:
        _say(json.dumps(doc, indent=2))
        return
    _say(f"{path}: fingerprint {doc['fingerprint'][:16]}, {doc['converted']} images converted to 48x48 gray")
    _say(f"{'split':<6}{'total':>7}" + "".join(f"{c:>10}" for c in CLASSES))
    for split, s in doc["splits"].items():
        _say(f"{split:<6}{s['total']:>7}" + "".join(f"{s['per_class'][c]:>10}" for c in CLASSES))


@main.command()
@storage_option
@config_option
@click.option("--json", "as_json", is_flag=True, help="one JSON document on stdout: a list of status documents")
def studies(storage: str | None, config: Path | None, as_json: bool) -> None:
    """Every study in the storage: trials by state, best, baseline, training time."""
    from fer_search.status import studies_status
    from fer_search.storage import open_existing_storage, redacted

    cfg = _config(config, **{"study.storage": storage})
    docs = studies_status(open_existing_storage(cfg.study.storage))
    if as_json:
        _say(json.dumps(docs, indent=2))
    elif not docs:
        _say(f"no studies in {redacted(cfg.study.storage)} (start one with `fer-search run`)")
    else:
        _print_table(["study", "trials", "best val_acc", "baseline val_acc", "training"], [_study_row(d) for d in docs])


def _study_row(doc: dict[str, Any]) -> list[str]:
    best, base = doc["best"], doc["baseline"]
    best_text = "-" if best is None else f"{accuracy_text(best['value'])} (trial {best['number']})"
    if base is None:
        base_text = "excluded by [space]" if doc.get("baseline_excluded") else "-"
    else:
        state = "" if base["state"] == "COMPLETE" else f", {base['state'].lower()}"
        base_text = f"{accuracy_text(base['value'])} (trial {base['number']}{state})"
    return [doc["study"], _trial_counts(doc) or "none", best_text, base_text, f"{doc['seconds'] / 60:.1f} min"]


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        _say("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


@main.command()
@study_option
@storage_option
@config_option
@click.option("--format", "fmt", help="csv or json (default: from --out's suffix, else csv)")
@click.option("--out", type=click.Path(path_type=Path), help="file to write (default: stdout)")
def export(study: str | None, storage: str | None, config: Path | None, fmt: str | None, out: Path | None) -> None:
    """Every trial of the study, a row each: number, value, times, params, epochs, state."""
    from fer_search.export import export_format, export_trials
    from fer_search.files import write_file
    from fer_search.storage import load_existing_study

    fmt = export_format(fmt, out)  # before the database is read: a mistyped suffix costs nothing
    cfg = _config(config, **{"study.name": study, "study.storage": storage})
    text = export_trials(load_existing_study(cfg.study.storage, cfg.study.name), fmt)
    if out is None:
        _say(text, nl=False)
    else:
        write_file(out, text.encode())
