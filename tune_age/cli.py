"""`tune-age`: the command line. Argument parsing only; each subcommand calls one library function.

    tune-age synth OUT --n 3000 --seed 0
    tune-age train [--data PATH] [--config FILE.yaml] [--out DIR] [key=value ...]
    tune-age search [--data PATH] [--space quick] [--num-samples N] ...

Errors the user can fix print one line (`tune-age: error: ...`) and exit 2;
Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from .errors import TuneAgeError

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="a UTKFace-named folder, a folder per group, or a CSV of "
                   "path,age / path,age_group (default: built-in synthetic faces)")
    p.add_argument("--format", default="auto", help="auto, utkface, folders or csv")
    p.add_argument("--bins", default="decades",
                   help="age groups: decades, adience, fairface, or edges such as 0,13,20,40,60")
    p.add_argument("--synthetic-n", type=int, default=3000, help="built-in faces to draw without --data")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the train/val/test split")


def _data_config(args: argparse.Namespace):
    from .config import DataConfig

    return DataConfig(path=args.data, format=args.format, bins=args.bins,
                      synthetic_n=args.synthetic_n, split_seed=args.split_seed)


def cmd_synth(args: argparse.Namespace) -> int:
    from .synthetic import write_synthetic

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise TuneAgeError(f"{out} exists and is not empty; choose a new folder")
    t = time.perf_counter()
    paths = write_synthetic(out, n=args.n, seed=args.seed, size=args.size)
    print(f"wrote {len(paths)} synthetic faces to {out} in {time.perf_counter() - t:.1f} s")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .config import TrainConfig, apply_overrides, load_yaml
    from .data import load_data
    from .engine import Diverged
    from .spaces import parse_space
    from .training import train

    cfg = TrainConfig()
    if args.config:
        values = load_yaml(args.config)
        if "params" in values:  # a search-space file whose parameters are all fixed
            values = parse_space(values, args.config).fixed()
        cfg = TrainConfig.from_dict({**cfg.to_dict(), **values}, source=args.config)
    cfg = apply_overrides(cfg, args.overrides)
    out = Path(args.out or time.strftime("runs/train-%Y%m%d-%H%M%S"))
    if (out / "checkpoint.pt").exists() and not args.force:
        raise TuneAgeError(f"{out} already holds a checkpoint; choose another --out or add --force")
    data = load_data(_data_config(args), [cfg.image_size])
    out.mkdir(parents=True, exist_ok=True)
    data.split_table().to_csv(out / "split.csv", index=False)
    print(f"data: {data.source}")
    print(f"training {cfg.epochs} epochs; checkpoints in {out}")

    def show(m: dict) -> None:
        print(f"epoch {m['epoch']:3d}  train_loss {m['train_loss']:.4f}  val_loss {m['val_loss']:.4f}  "
              f"val_acc {m['val_acc']:.4f}  val_one_off {m['val_one_off']:.4f}  "
              f"val_f1 {m['val_f1']:.4f}  {m['images_per_sec']:.0f} img/s", flush=True)

    try:
        best = train(cfg, data, out, on_epoch=show)
    except Diverged as exc:
        raise TuneAgeError(f"{exc}; checkpoints of the epochs before are in {out}") from None
    print(f"best val_acc {best['val_acc']:.4f} at epoch {best['epoch']}; saved {out / 'best.pt'}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from .config import SearchConfig
    from .results import load_experiment, summary_lines
    from .search import experiment_dir, run_search

    search = SearchConfig(
        space=args.space, num_samples=args.num_samples, metric=args.metric, max_epochs=args.max_epochs,
        cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
        max_concurrent=args.max_concurrent, address=args.address, storage=args.storage,
        time_budget_min=args.time_budget, name=args.name or time.strftime("search-%Y%m%d-%H%M%S"),
        resume=args.resume, seed=args.seed, scheduler=args.scheduler, searcher=args.searcher,
        baseline_first=not args.no_baseline, max_failures=args.max_failures,
    )
    exp_dir, _ = experiment_dir(search)
    try:
        run_search(search, _data_config(args))
    except KeyboardInterrupt:
        print(f"\ninterrupted; the search state is saved. Resume with:\n  {resume_command(search)}")
        return EXIT_INTERRUPTED
    print()
    for line in summary_lines(load_experiment(exp_dir)):
        print(line)
    return 0


def resume_command(search) -> str:
    parts = ["tune-age search", f"--name {search.name}"]
    if search.storage:
        parts.append(f"--storage {search.storage}")
    if search.address:
        parts.append(f"--address {search.address}")
    return " ".join(parts + ["--resume"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tune-age", description=__doc__.split("\n")[0],
                                     formatter_class=_Formatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logs, Ray's too")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write built-in synthetic faces as UTKFace-named JPEGs",
                       formatter_class=_Formatter)
    p.add_argument("out", help="a new folder")
    p.add_argument("--n", type=int, default=3000, help="number of images")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--size", type=int, default=128, help="pixels per side")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("train", help="train one configuration", formatter_class=_Formatter)
    _data_args(p)
    p.add_argument("--config", help="a YAML file of TrainConfig values (or a space with fixed values)")
    p.add_argument("--out", help="output folder (default: runs/train-TIMESTAMP)")
    p.add_argument("--force", action="store_true", help="overwrite checkpoints in --out")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="TrainConfig overrides, e.g. lr=0.01")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("search", help="run a hyperparameter search with Ray Tune and Optuna",
                       formatter_class=_Formatter)
    _data_args(p)
    p.add_argument("--space", default="quick", help="a built-in space name or a YAML path")
    p.add_argument("--num-samples", type=int, help="trials to run (default: the space's)")
    p.add_argument("--metric", default="val_acc", help="val_acc, val_one_off, val_f1, val_balanced_acc, "
                   "val_loss or val_mae")
    p.add_argument("--max-epochs", type=int, help="epochs per trial at most (default: the space's)")
    p.add_argument("--cpus-per-trial", type=float, help="default: 1 (2 on machines with over 4 CPUs); "
                   "with GPUs, the CPUs divided among the trials that fit")
    p.add_argument("--gpus-per-trial", type=float, help="default: 1 where Ray sees GPUs, else 0; "
                   "fractions pack trials on one GPU")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: as resources allow)")
    p.add_argument("--address", help="join a Ray cluster: auto or ray://HOST:PORT (default: local Ray)")
    p.add_argument("--storage", help="experiment storage path (default: ~/tune_age_results)")
    p.add_argument("--time-budget", type=float, help="stop starting trials after this many minutes")
    p.add_argument("--name", help="experiment name (default: search-TIMESTAMP)")
    p.add_argument("--resume", action="store_true", help="continue the search named by --name")
    p.add_argument("--seed", type=int, default=0, help="seed of the TPE sampler")
    p.add_argument("--scheduler", default="asha", help="asha (early stopping) or fifo")
    p.add_argument("--searcher", default="tpe", help="tpe (Optuna) or random")
    p.add_argument("--no-baseline", action="store_true", help="don't evaluate the seed baseline first")
    p.add_argument("--max-failures", type=int, default=2, help="retries of a crashing trial")
    p.set_defaults(func=cmd_search)
    return parser


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("tune_age")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
    if not verbose:
        import os

        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        for name in ("ray", "optuna"):
            logging.getLogger(name).setLevel(logging.WARNING)
        try:
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)
        except ImportError:
            pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except TuneAgeError as exc:
        print(f"tune-age: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\ntune-age: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
