"""Search-speed benchmark: trials/hour and the share of epochs the pruner saves, on a real study.

    python benchmarks/search_speed.py --data PATH --trials 50 --epochs 30 [--workers K] [--device cuda]
    python benchmarks/search_speed.py --data PATH --train-images 3000 --val-images 1000 ...   # a CPU-sized subset

Runs `fer-search run` (the real service, fresh SQLite study in a temporary folder) and prints
trials_per_hour, epochs_run, epochs_unpruned (trials x epochs: what the same study would train
without pruning) and fraction_of_epochs_saved on their own lines. A subset is a folder of
symbolic links to a stratified sample of the data set (nothing is copied).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import optuna
from optuna.trial import TrialState

from fer_search.config import load_config
from fer_search.search import run_search


def linked_subset(data: Path, into: Path, train_images: int, val_images: int, seed: int) -> Path:
    """train/ and the PublicTest files of test/, stratified down to the given totals, as symlinks."""
    rng = random.Random(seed)
    for split, prefix, total in (("train", "", train_images), ("test", "PublicTest_", val_images)):
        by_class: dict[str, list[Path]] = defaultdict(list)
        for path in sorted((data / split).glob(f"*/{prefix}*")):
            by_class[path.parent.name].append(path)
        count = sum(len(v) for v in by_class.values())
        for cls, paths in by_class.items():
            keep = rng.sample(paths, max(1, round(len(paths) * min(1.0, total / count))))
            (into / split / cls).mkdir(parents=True, exist_ok=True)
            for path in keep:
                (into / split / cls / path.name).symlink_to(path.resolve())
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-images", type=int, default=0, help="0 = the whole training set")
    parser.add_argument("--val-images", type=int, default=0, help="0 = all of PublicTest")
    parser.add_argument("--config", type=Path, help="a search.toml whose [pruner] and [space] to use")
    parser.add_argument(
        "--keep",
        type=Path,
        help="a new folder to keep the study in (default: a temporary one); "
        "`fer-search status --storage sqlite:///KEEP/b.db` watches it",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.keep is not None:
            args.keep.mkdir(parents=True)
            folder = args.keep.resolve()
        data = args.data
        if args.train_images or args.val_images:
            data = linked_subset(
                args.data, folder / "data", args.train_images or 10**9, args.val_images or 10**9, args.seed
            )
        overrides = {
            "data.path": data,
            "data.cache_dir": folder / "cache",
            "study.storage": f"sqlite:///{folder}/b.db",
            "study.artifacts": folder / "artifacts",
            "run.trials": args.trials,
            "run.epochs": args.epochs,
            "run.workers": args.workers,
            "run.device": args.device,
            "run.seed": args.seed,
        }
        config = load_config(args.config or Path(__file__).resolve().parents[1] / "search.toml", overrides)
        start = time.perf_counter()
        run_search(config)
        seconds = time.perf_counter() - start
        study = optuna.load_study(study_name=config.study.name, storage=config.study.storage)
        trials = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
        epochs_run = sum(t.user_attrs.get("epochs_run", 0) for t in trials)
        unpruned = len(trials) * args.epochs
        print(f"machine={platform.node()} cpus={os.cpu_count()} device={args.device} workers={args.workers}")
        print(f"data={args.data} train_images={args.train_images or 'all'} val_images={args.val_images or 'all'}")
        print(
            f"trials={len(trials)} complete={sum(t.state == TrialState.COMPLETE for t in trials)} "
            f"pruned={sum(t.state == TrialState.PRUNED for t in trials)} best={study.best_value:.4f} "
            f"baseline={study.trials[0].value:.4f}"
        )
        print(f"wall_seconds={seconds:.1f}")
        print(f"trials_per_hour={len(trials) / seconds * 3600:.1f}")
        print(f"epochs_run={epochs_run}")
        print(f"epochs_unpruned={unpruned}")
        print(f"fraction_of_epochs_saved={1 - epochs_run / unpruned:.2f}")


if __name__ == "__main__":
    main()
