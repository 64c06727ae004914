"""The fer-search command line: parses, calls one function, prints; user errors exit 2."""

from __future__ import annotations

import json
import math
import shlex
import sys
from pathlib import Path
from typing import Any

import click

from fer_search.errors import Crashed, UserError, configure_logging, logging_to
from fer_search.processes import Terminated, exit_code, signals_deferred, sigterm_interrupts


class _Cli(click.Group):
    """Turns a user's mistake into one line and exit 2, a crash told above into one line and exit 1, and
    Ctrl-C or SIGTERM into exit 130 or 143, everywhere."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with sigterm_interrupts():
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


def _interrupted(interrupt: KeyboardInterrupt) -> str:
    return "terminated" if isinstance(interrupt, Terminated) else "interrupted"


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fer-search")
def main() -> None:
    """Hyperparameter search for facial-expression recognition on FER2013."""
    configure_logging()


def _config(config: Path | None, **overrides: Any) -> Any:
    from fer_search.config import load_config

    return load_config(config, {k: v for k, v in overrides.items() if v is not None})


config_option = click.option(
    "--config", type=click.Path(path_type=Path), help="search.toml to read (default ./search.toml)"
)
study_option = click.option("--study", help="study name (study.name)")
storage_option = click.option("--storage", help="storage URL, e.g. sqlite:///studies/fer2013.db or postgresql://...")
data_option = click.option("--data", type=click.Path(path_type=Path), help="FER2013 folder or fer2013.csv (data.path)")
device_option = click.option("--device", help="auto, cpu, cuda or cuda:K")


@main.command()
@click.option("--trials", type=int, help="the study's total of finished trials, across all workers")
@study_option
@storage_option
@data_option
@config_option
@click.option("--epochs", type=int, help="most epochs per trial (stored in the study)")
@device_option
@click.option("--workers", type=int, help="worker processes on this machine")
@click.option("--seed", type=int, help="base random seed")
@click.option("--timeout", type=float, help="stop taking trials after this many seconds")
@click.option(
    "--ignore-mismatch", is_flag=True, default=None, help="continue a study whose data, space or epochs changed"
)
def run(
    trials: int | None,
    study: str | None,
    storage: str | None,
    data: Path | None,
    config: Path | None,
    epochs: int | None,
    device: str | None,
    workers: int | None,
    seed: int | None,
    timeout: float | None,
    ignore_mismatch: bool | None,
) -> None:
    """Search until the study holds --trials finished trials."""
    with signals_deferred():  # torch's import cannot be interrupted cleanly
        from fer_search.search import run_search

    cfg = _config(
        config,
        **{
            "run.trials": trials,
            "study.name": study,
            "study.storage": storage,
            "data.path": data,
            "run.epochs": epochs,
            "run.device": device,
            "run.workers": workers,
            "run.seed": seed,
            "run.timeout": timeout,
            "run.ignore_mismatch": ignore_mismatch,
        },
    )
    live = _LiveLines() if sys.stderr.isatty() else None
    try:
        with logging_to(live):
            outcome = run_search(cfg, live, command_line(click.get_current_context()))
    except KeyboardInterrupt as e:
        click.echo(
            f"\n{_interrupted(e)}: the study is saved; the interrupted trial is queued again and resumes from its "
            f"last checkpoint, if it wrote one.\nresume with: {command_line(click.get_current_context())}",
            err=True,
        )
        sys.exit(exit_code(e))
    if outcome.timed_out:
        click.echo(f"timeout reached after {cfg.run.timeout:g} s: stopped taking trials", err=True)
    _print_status(outcome.status)


def command_line(ctx: click.Context) -> str:
    """The command as the user could type it again (from the parsed options; passwords hidden)."""
    words = ["fer-search", *ctx.command_path.split()[1:]]  # the same program however it was started
    for param in ctx.command.params:
        value = ctx.params.get(param.name or "")
        if not isinstance(param, click.Option) or value is None or value is False or value == param.default:
            continue
        if param.name == "storage":
            from fer_search.storage import redacted

            value = redacted(str(value))
        words += [param.opts[-1]] if param.is_flag else [param.opts[-1], str(value)]
    return shlex.join(words)


class _LiveLines:
    """On a terminal: one live line per worker, and a lasting line above them for each trial that ends."""

    def __init__(self) -> None:
        self.lines: dict[int, str] = {}
        self.drawn = 0  # live lines now on the screen, below the lasting ones

    def __call__(self, p: Any) -> None:
        if isinstance(p, str):  # a log line
            self._draw(p)
            return
        best = "-" if p.best is None else f"{p.best:.4f}"
        if p.state == "RUNNING":
            self.lines[p.worker] = (
                f"[w{p.worker}] trial {p.trial} epoch {p.epoch}/{p.epochs} val_acc {p.val_acc:.4f} best {best}"
            )
            self._draw()
        else:
            self.lines.pop(p.worker, None)
            value = "-" if math.isnan(p.val_acc) else f"{p.val_acc:.4f}"
            self._draw(f"[w{p.worker}] trial {p.trial} {p.state.lower()} after {p.epoch} epochs: {value} (best {best})")

    def _draw(self, lasting: str | None = None) -> None:
        # Up to the first live line, clear to the end of the screen, then print everything again.
        text = "\033[F" * self.drawn + "\r\033[J" + (lasting + "\n" if lasting else "")
        live = [self.lines[w] for w in sorted(self.lines)]
        click.echo(text + "".join(line + "\n" for line in live), nl=False, err=True, color=True)  # made for a terminal
        self.drawn = len(live)


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
    loaded = load_existing_study(cfg.study.storage, cfg.study.name)
    doc = study_status(loaded)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    else:
        _print_status(doc, loaded.user_attrs.get("baseline_excluded", False))


def _print_status(doc: dict[str, Any], baseline_excluded: bool = False) -> None:
    counts = ", ".join(f"{n.lower()} {c}" for n, c in doc["trials"].items() if c)
    click.echo(f"study {doc['study']}: {counts or 'no trials'}; {doc['seconds'] / 60:.1f} min of training")
    best, base = doc["best"], doc["baseline"]
    if best:
        click.echo(f"best: trial {best['number']}, val_acc {best['value']:.4f}")
        click.echo("  " + ", ".join(f"{k}={v}" for k, v in best["params"].items() if v is not None))
    if base:
        value = "-" if base["value"] is None else f"{base['value']:.4f}"
        click.echo(f"baseline: trial {base['number']} ({base['state'].lower()}), val_acc {value}")
    elif baseline_excluded:
        click.echo("baseline: not in this study ([space] excludes one of its values)")


@main.command()
@storage_option
@click.option("--artifacts", type=click.Path(path_type=Path), help="artifact store folder (study.artifacts)")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=int)
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
@data_option
@config_option
@click.option("--epochs", type=int, help="epochs per retraining (default: the study's)")
@click.option("--seeds", type=int, help="seeds per configuration")
@click.option("--no-baseline", is_flag=True, default=None, help="do not retrain the baseline")
@device_option
@click.option("--out", type=click.Path(path_type=Path), help="output folder (default studies/<study>/final)")
@click.option("--jobs", type=int, help="seed runs trained at once, in as many processes sharing the device")
def finalize(
    study: str | None,
    storage: str | None,
    data: Path | None,
    config: Path | None,
    epochs: int | None,
    seeds: int | None,
    no_baseline: bool | None,
    device: str | None,
    out: Path | None,
    jobs: int | None,
) -> None:
    """Retrain the best trial and the baseline, evaluate on the test set, write the reports."""
    with signals_deferred():  # torch's import cannot be interrupted cleanly
        from fer_search.finalize import finalize_study

    cfg = _config(
        config,
        **{
            "study.name": study,
            "study.storage": storage,
            "data.path": data,
            "finalize.epochs": epochs,
            "finalize.seeds": seeds,
            "run.device": device,
            "finalize.out": out,
            "finalize.baseline": None if no_baseline is None else not no_baseline,
            "finalize.jobs": jobs,
        },
    )
    summary = finalize_study(cfg, command_line(click.get_current_context()), _print_line)
    click.echo(summary)


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
            click.echo(json.dumps({"path": str(p.path), "label": p.label, "probs": p.probs}))
        else:
            top = ", ".join(f"{c} {v:.2f}" for c, v in sorted(p.probs.items(), key=lambda kv: -kv[1])[:3])
            click.echo(f"{p.path}: {p.label}  ({top})")


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
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(f"{path}: fingerprint {doc['fingerprint'][:16]}, {doc['converted']} images converted to 48x48 gray")
    click.echo(f"{'split':<6}{'total':>7}" + "".join(f"{c:>10}" for c in CLASSES))
    for split, s in doc["splits"].items():
        click.echo(f"{split:<6}{s['total']:>7}" + "".join(f"{s['per_class'][c]:>10}" for c in CLASSES))
