"""`tune-age`: the command line. Argument parsing only; each subcommand calls one library function.

    tune-age synth OUT --n 3000 --seed 0
    tune-age faces PHOTOS OUT [--size 224] [--all-faces]
    tune-age train [--data PATH] [--config FILE.yaml] [--out DIR] [key=value ...]
    tune-age search [--data PATH] [--space quick] [--num-samples N] ...
    tune-age trials EXP [--sort METRIC] [--top N] [--status S] [--format table|csv|markdown|json]
    tune-age report EXP [--out DIR] [--rerun-top K --seeds S]
    tune-age export EXP --out best.pt [--metric M] [--pt2] [--onnx] [--force]
    tune-age predict best.pt IMAGE_OR_DIR... [--top 3] [--format table|csv|json] [--detect-faces]
    tune-age dashboard EXP [--port 8080]
    tune-age evaluate best.pt --data PATH [--format table|json]

Errors the user can fix print one line (`tune-age: error: ...`) and exit 2;
Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from pathlib import Path

from .errors import TuneAgeError

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Appends "(default: X)" unless the help already says what the default is in words."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or "default" in text:
            return text
        return super()._get_help_string(action)


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="a UTKFace-named folder, a folder per group, or a CSV of "
                   "path,age / path,age_group (default: built-in synthetic faces)")
    p.add_argument("--layout", default="auto", help="the data's layout: auto, utkface, folders or csv")
    # The old spelling: --format is the output format everywhere else (evaluate, trials, predict).
    p.add_argument("--format", dest="old_layout", help=argparse.SUPPRESS)
    p.add_argument("--bins", default="decades",
                   help="age groups: decades, adience, fairface, or edges such as 0,13,20,40,60")
    p.add_argument("--synthetic-n", type=int, default=3000, help="built-in faces to draw without --data")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the train/val/test split")
    p.add_argument("--detect-faces", action="store_true", help="find and align the face in each photo "
                   "first (as tune-age faces does; cached), skipping photos with none")
    p.add_argument("--dedupe", default="exact", choices=("exact", "near", "off"),
                   help="duplicates to drop before the split: exact (the same file or bytes), near "
                   "(also copies with a near-equal perceptual hash) or off")


def _data_config(args: argparse.Namespace):
    from .config import DataConfig

    layout = args.layout
    if args.old_layout is not None:
        if "layout" in getattr(args, "given", ()) and args.old_layout != args.layout:
            raise TuneAgeError(f"--format {args.old_layout} and --layout {args.layout}: give the layout once, "
                               "as --layout")
        print("tune-age: note: the data layout's flag is --layout now; --format still works for it here",
              file=sys.stderr)
        layout = args.old_layout
    return DataConfig(path=args.data, format=layout, bins=args.bins,
                      synthetic_n=args.synthetic_n, split_seed=args.split_seed, dedupe=args.dedupe,
                      detect_faces=args.detect_faces)


def cmd_synth(args: argparse.Namespace) -> int:
    from .data.synthetic import write_synthetic

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise TuneAgeError(f"{out} exists and is not empty; choose a new folder")
    t = time.perf_counter()
    paths = write_synthetic(out, n=args.n, seed=args.seed, size=args.size)
    print(f"wrote {len(paths)} synthetic faces to {out} in {time.perf_counter() - t:.1f} s")
    return 0


def cmd_faces(args: argparse.Namespace) -> int:
    from .data.faces import align_folder

    summary = align_folder(args.src, args.out, size=args.size, padding=args.padding, all_faces=args.all_faces)
    for line in summary.lines(Path(args.out)):
        print(line)
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from .results import load_experiment

    exp = load_experiment(args.exp)
    try:
        from optuna_dashboard import run_server
    except ImportError:
        raise TuneAgeError("tune-age dashboard needs optuna-dashboard: pip install optuna-dashboard") from None
    url = exp.study_url
    print(f"optuna-dashboard on {exp.name}'s study: http://{args.host}:{args.port}/ (Ctrl-C stops)", flush=True)
    run_server(url, host=args.host, port=args.port)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .config import TrainConfig, apply_overrides, load_yaml
    from .data import load_data
    from .training.engine import Diverged
    from .search.spaces import parse_space
    from .models.weights import pretrained_state
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
    weights = pretrained_state(cfg.arch, args.weights_dir) if cfg.pretrained else None
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
        best = train(cfg, data, out, on_epoch=show, weights=weights)
    except Diverged as exc:
        raise TuneAgeError(f"{exc}; checkpoints of the epochs before are in {out}") from None
    print(f"best val_acc {best['val_acc']:.4f} at epoch {best['epoch']}; saved {out / 'best.pt'}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from .config import SearchConfig
    from .results import last_error, load_experiment, summary_lines
    from .search import SearchInterrupted, experiment_dir, run_search

    search = _as_flags(SearchConfig, {"time_budget_min": "time_budget"})(
        space=args.space, num_samples=args.num_samples, max_epochs=args.max_epochs,
        metric=args.objectives.split(",")[0].strip() if args.objectives and "metric" not in args.given
        else args.metric,
        cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
        max_concurrent=args.max_concurrent, address=args.address, storage=args.storage,
        time_budget_min=args.time_budget, name=args.name or time.strftime("search-%Y%m%d-%H%M%S"),
        resume=args.resume, seed=args.seed, scheduler=args.scheduler, searcher=args.searcher,
        baseline_first=not args.no_baseline, max_failures=args.max_failures, weights_dir=args.weights_dir,
        cv=args.cv, warm_start=args.warm_start, objectives=args.objectives, mlflow=args.mlflow,
        study_storage=args.study_storage, memory_map=args.memory_map,
    )
    exp_dir, _ = experiment_dir(search)
    fields = {"time_budget": "time_budget_min", "no_baseline": "baseline_first", "data": "path",
              "layout": "format"}
    given = frozenset(fields.get(dest, dest) for dest in args.given)
    try:
        run_search(search, _data_config(args), given=given)
    except (KeyboardInterrupt, SearchInterrupted):
        print(f"\ninterrupted; the search state is saved. Resume with:\n  {resume_command(search)}")
        return EXIT_INTERRUPTED
    print()
    exp = load_experiment(exp_dir)
    for line in summary_lines(exp):
        print(line)
    errored = [t for t in exp.trials.values() if t["status"] == "errored"]
    if errored and exp.best_trial() is None:  # nothing to export: a failure, not a result
        first = errored[0]
        print(f"tune-age: error: every trial that ran failed ({len(errored)} errored); trial "
              f"{first['trial_id']}: {last_error(first) or 'no message'} (traceback: "
              f"{exp.trial_dir(first) / 'error.txt'})", file=sys.stderr)
        return 1
    return 0


def _as_flags(cls, renamed: dict[str, str]):
    """Builds `cls`, rewording its errors from field names (num_samples=0) to flags (--num-samples 0)."""
    from .errors import ConfigError

    def build(**values):
        try:
            return cls(**values)
        except ConfigError as exc:
            text = str(exc)
            for name in values:
                flag = "--" + renamed.get(name, name).replace("_", "-")
                text = text.replace(f"{name}=", f"{flag} ", 1) if text.startswith(f"{name}=") else text
            raise ConfigError(text) from None

    return build


def resume_command(search) -> str:
    parts = ["tune-age search", f"--name {search.name}"]
    if search.storage:
        parts.append(f"--storage {search.storage}")
    if search.address:
        parts.append(f"--address {search.address}")
    return " ".join(parts + ["--resume"])


# --- after a search: results, report, export, predict, evaluate -------------------------------


def _names(values: list[str] | None) -> list[str] | None:
    """["a,b", "c"] -> ["a", "b", "c"]: lists may be given with commas or as separate words."""
    if not values:
        return None
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


@contextlib.contextmanager
def _quiet_data_logs(args: argparse.Namespace):
    """Keeps the data pipeline's progress lines out of results (and out of JSON/CSV on stdout)."""
    logger = logging.getLogger("tune_age.data")
    level = logger.level
    if not args.verbose:
        machine = getattr(args, "format", "table") not in ("table", "markdown")
        logger.setLevel(logging.ERROR if machine else logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def cmd_trials(args: argparse.Namespace) -> int:
    from .results import follow, load_experiment, render, trials_table

    def draw(exp) -> str:
        table = trials_table(exp, sort=args.sort, top=args.top, status=_names(args.status),
                             columns=_names(args.columns), reverse=args.reverse)
        return render(exp, table, args.format, full=args.wide, first=args.sort)

    if not args.follow:
        print(draw(load_experiment(args.exp)), end="")
        return 0
    clear = sys.stdout.isatty()
    try:
        for i, text in enumerate(follow(args.exp, draw, args.interval)):
            if clear:
                print("\033[H\033[J", end="")
            elif i:
                print()
            print(f"{time.strftime('%H:%M:%S')} (refreshed every {args.interval:g} s; Ctrl-C stops)")
            print(text, end="", flush=True)
    except KeyboardInterrupt:
        print()
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .results.report import write_report

    with _quiet_data_logs(args):
        report = write_report(args.exp, args.out, top=args.top, rerun_top_k=args.rerun_top,
                              seeds=args.seeds, evaluate=not args.no_eval)
    for line in report.summary:
        print(line)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .errors import ConfigError
    from .results.export import export_best

    if args.torchscript:
        raise ConfigError("--torchscript was replaced by --pt2: TorchScript is deprecated in PyTorch; --pt2 "
                          "writes a torch.export program with the same preprocessing (load it with "
                          "torch.export.load(path).module())")

    with _quiet_data_logs(args):
        result = export_best(args.exp, args.out, metric=args.metric, force=args.force,
                             program=args.pt2, refit=args.refit, pick=args.pick, onnx=args.onnx,
                             calibrated=args.calibrate)
    for line in result.lines():
        print(line)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import json

    from .results.predict import describe_skipped, prediction_frame, predict, predict_faces

    with _quiet_data_logs(args):
        run = predict_faces if args.detect_faces else predict
        rows, skipped = run(args.model, args.inputs, top=args.top, device=args.device)
    if args.format == "json":
        print(json.dumps(rows, indent=1))
    elif args.format == "csv":
        print(prediction_frame(rows).to_csv(index=False), end="")
    else:
        width = max(4, *(len(r["path"]) for r in rows))
        face = "face  box                    " if args.detect_faces else ""
        print(f"{'path':<{width}}  {face}{'group':>6}  {'prob':>5}  top {args.top}")
        for r in rows:
            tops = ", ".join(f"{t['group']} {t['probability']:.2f}" for t in r["top"])
            where = f"{r['face']:>4}  {' '.join(map(str, r['box'])):<21}  " if args.detect_faces else ""
            print(f"{r['path']:<{width}}  {where}{r['group']:>6}  {r['probability']:5.2f}  {tops}")
    if skipped:
        what = "photo(s) with no face or unreadable" if args.detect_faces else "file(s) that could not be read as images"
        print(f"skipped {len(skipped)} {what} (first: {describe_skipped(skipped)})", file=sys.stderr)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from .results.predict import evaluate, metric_lines

    data = args.data
    if args.detect_faces:
        from .data.decode import cache_root
        from .data.faces import aligned_source

        data = aligned_source(args.data, cache_root())
    with _quiet_data_logs(args):
        metrics = evaluate(args.model, data, layout=args.layout, device=args.device,
                           include_seen=args.include_seen,
                           by=[b.strip() for b in args.by.split(",")] if args.by else None)
    if args.format == "json":
        print(json.dumps(metrics, indent=1))
    else:
        print("\n".join(metric_lines(metrics)))
    return 0


def _shown_default(text: str) -> str:
    """Help that names a default in words: `%(default).0s` formats the None default as
    nothing, which also stops argparse from appending "(default: None)"."""
    return f"(default%(default).0s: {text})"


def _add_results_commands(sub) -> None:
    p = sub.add_parser("dashboard", help="optuna-dashboard on an experiment's study (when installed)",
                       formatter_class=_Formatter)
    p.add_argument("exp", help="the experiment folder, or its URI (s3://BUCKET/PREFIX/NAME)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on")
    p.add_argument("--port", type=int, default=8080, help="port to serve on")
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser("trials", help="one row per trial of an experiment (works while it runs)",
                       formatter_class=_Formatter)
    p.add_argument("exp", help="the experiment folder that `tune-age search` printed, or its URI")
    p.add_argument("--sort", help="a metric (best first: val_acc, val_f1, val_loss, ...) or a column "
                   "(ascending: lr, epochs, status, ...) " + _shown_default("the search's metric"))
    p.add_argument("--reverse", action="store_true", help="reverse the order")
    p.add_argument("--top", type=int, help="show only the first N rows " + _shown_default("all"))
    p.add_argument("--status", nargs="+", help="keep trials with these statuses: completed, "
                   "early-stopped, errored, diverged, running, pending, retrying, interrupted, stopped, lost "
                   + _shown_default("all"))
    p.add_argument("--columns", nargs="+", help="columns to show, e.g. trial_id best_val_acc lr "
                   + _shown_default("all; the table format shows those that fit"))
    p.add_argument("--format", default="table", choices=("table", "csv", "markdown", "json"),
                   help="table fits the terminal; the others hold every column")
    p.add_argument("--wide", action="store_true", help="table: every hyperparameter, however wide")
    p.add_argument("--follow", action="store_true", help="redraw until the search ends (Ctrl-C stops)")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between redraws with --follow")
    p.set_defaults(func=cmd_trials)

    p = sub.add_parser("report", help="report.md, report.html and plots: best configurations, "
                       "importance, curves, the best model on val and test", formatter_class=_Formatter)
    p.add_argument("exp", help="the experiment folder, or its URI (s3://BUCKET/PREFIX/NAME)")
    p.add_argument("--out", help="output folder " + _shown_default("EXP/report"))
    p.add_argument("--top", type=int, default=5, help="configurations in the top table")
    p.add_argument("--rerun-top", type=int, default=0, metavar="K",
                   help="retrain the top K configurations on the CPU with --seeds seeds each")
    p.add_argument("--seeds", type=int, default=3, help="seeds per configuration with --rerun-top")
    p.add_argument("--no-eval", action="store_true",
                   help="skip evaluating the best model on the validation and test splits")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("export", help="the best checkpoint over all epochs of all trials, as one file",
                       formatter_class=_Formatter)
    p.add_argument("exp", help="the experiment folder, or its URI (s3://BUCKET/PREFIX/NAME)")
    p.add_argument("--out", default="best.pt", help="the file to write")
    p.add_argument("--metric", help="choose by this metric: val_acc, val_one_off, val_f1, "
                   "val_balanced_acc, val_loss or val_mae " + _shown_default("the search's"))
    p.add_argument("--pt2", action="store_true", help="also write OUT.pt2, a torch.export program with the "
                   "preprocessing built in (uint8 RGB, any size), checked against PyTorch; needs only torch")
    p.add_argument("--torchscript", action="store_true", help=argparse.SUPPRESS)  # replaced by --pt2
    p.add_argument("--onnx", action="store_true", help="also write OUT.onnx: preprocessing built in, runs in "
                   "onnxruntime; checked against PyTorch on the validation images before it is written")
    p.add_argument("--calibrate", action="store_true", help="fit a temperature on the validation split so "
                   "the probabilities mean what they say; applied in every exported form")
    p.add_argument("--force", action="store_true", help="replace existing files")
    p.add_argument("--refit", action="store_true", help="retrain the best configuration on train+val "
                   "for its best epoch count, score it once on the test split, and export that model")
    p.add_argument("--pick", metavar="RULE", help='the most accurate trial that meets a constraint, '
                   'such as "latency_ms<=5" (latency_ms, latency64_ms, params or the metric)')
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("predict", help="the age group of each image", formatter_class=_Formatter)
    p.add_argument("model", help="an export (tune-age export) or a checkpoint (tune-age train)")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders")
    p.add_argument("--top", type=int, default=3, help="groups listed per image, most likely first")
    p.add_argument("--detect-faces", action="store_true", help="find and align the faces in each photo "
                   "and predict each (one row per face, with its box); needs the faces extra")
    p.add_argument("--format", default="table", choices=("table", "csv", "json"), help="output format")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evaluate", help="metrics and confusion matrix on a labelled set",
                       formatter_class=_Formatter)
    p.add_argument("model", help="an export (tune-age export) or a checkpoint (tune-age train)")
    p.add_argument("--data", required=True, help="a UTKFace-named folder, a folder per group, "
                   "or a CSV of path,age / path,age_group")
    p.add_argument("--layout", default="auto", help="auto, utkface, folders or csv")
    p.add_argument("--by", metavar="gender,race", help="also accuracy, one-off accuracy and MAE per "
                   "gender, race or age_group (from a CSV's columns or UTKFace names), with intervals")
    p.add_argument("--detect-faces", action="store_true", help="find and align the face in each photo "
                   "first (cached), skipping photos with none")
    p.add_argument("--include-seen", action="store_true", help="also score images the model saw in "
                   "training or validation (left out by default: they flatter it)")
    p.add_argument("--format", default="table", choices=("table", "json"), help="output format")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.set_defaults(func=cmd_evaluate)


class _Parser(argparse.ArgumentParser):
    """No abbreviated flags (a prefix is an error, not a guess), and a mistyped flag gets the
    subcommand's usage and the nearest real flag."""

    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        import difflib

        if message.startswith("unrecognized arguments:") and getattr(self, "commands", None):
            command = next((self.commands[a] for a in getattr(self, "argv", []) if a in self.commands), None)
            if command is not None:
                flags = [o for action in command._actions for o in action.option_strings]
                wrong = message.split(":", 1)[1].split()
                flag = next((w.split("=")[0] for w in wrong if w.startswith("--")), None)
                close = difflib.get_close_matches(flag, flags, n=1) if flag else []
                hint = f"; did you mean {close[0]}?" if close else ""
                command.print_usage(sys.stderr)
                self.exit(2, f"{command.prog}: error: {message}{hint}\n")
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tune-age", description="Hyperparameter search for CNNs that tell a "
                     "person's age group from a face photo.", formatter_class=_Formatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logs, Ray's too")
    sub = parser.add_subparsers(dest="command", required=True)  # its parsers are _Parser too
    parser.commands = sub.choices

    p = sub.add_parser("synth", help="write built-in synthetic faces as UTKFace-named JPEGs",
                       formatter_class=_Formatter)
    p.add_argument("out", help="a new folder")
    p.add_argument("--n", type=int, default=3000, help="number of images")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--size", type=int, default=128, help="pixels per side")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("faces", help="aligned face crops of a folder of ordinary photos, labels kept",
                       formatter_class=_Formatter)
    p.add_argument("src", help="photos in any layout: UTKFace names, a folder per group, or a CSV")
    p.add_argument("out", help="a new folder: the crops in the same layout")
    p.add_argument("--size", type=int, default=224, help="pixels per side of each crop")
    p.add_argument("--padding", type=float, default=0.2, help="margin around the face, as a share of its size")
    p.add_argument("--all-faces", action="store_true", help="every face of a photo, not only the largest")
    p.set_defaults(func=cmd_faces)

    p = sub.add_parser("train", help="train one configuration", formatter_class=_Formatter)
    _data_args(p)
    p.add_argument("--config", help="a YAML file of TrainConfig values, or a space whose values are all fixed "
                   "(default: TrainConfig's defaults)")
    p.add_argument("--out", help="output folder (default: runs/train-TIMESTAMP)")
    p.add_argument("--force", action="store_true", help="overwrite checkpoints in --out")
    p.add_argument("--weights-dir", help="a folder of pretrained weight files (default: "
                   "$TUNE_AGE_WEIGHTS, then torchvision's cache $TORCH_HOME/hub/checkpoints)")
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
    p.add_argument("--time-budget", type=float, help="stop the search after this many minutes (default: no limit)")
    p.add_argument("--name", help="experiment name (default: search-TIMESTAMP)")
    p.add_argument("--resume", action="store_true", help="continue the search named by --name")
    p.add_argument("--seed", type=int, default=0, help="seed of the TPE sampler")
    p.add_argument("--scheduler", default="asha", help="asha (early stopping) or fifo")
    p.add_argument("--searcher", default="tpe", help="tpe (Optuna) or random")
    p.add_argument("--no-baseline", action="store_true", help="don't evaluate the seed baseline first")
    p.add_argument("--max-failures", type=int, default=2, help="retries of a crashing trial")
    p.add_argument("--weights-dir", help="a folder of pretrained weight files (default: "
                   "$TUNE_AGE_WEIGHTS, then torchvision's cache $TORCH_HOME/hub/checkpoints)")
    p.add_argument("--cv", type=int, help="train K folds of train+val in each trial and score their "
                   "pooled predictions (default: 5 when the validation split holds fewer than 200 "
                   "images, else 1; --cv 1: one split)")
    p.add_argument("--objectives", help="a multi-objective search: the metric, then latency_ms, "
                   "latency64_ms (batch 64) or params, comma-separated, e.g. val_acc,latency_ms; each "
                   "trial times its model on its device; ASHA prunes on the metric")
    p.add_argument("--study-storage", metavar="URL", help="keep the Optuna study in this database "
                   "(postgresql://USER@HOST/DB; password by PGPASSWORD or ~/.pgpass) instead of study.db in "
                   "the experiment folder; PostgreSQL needs tune_age[postgres]")
    p.add_argument("--memory-map", default="auto", metavar="{auto,on,off}",
                   help="on: trials map the images from the decode cache file (shared by the page "
                   "cache; nodes without it fetch it once), so the data may be larger than memory; "
                   "off: they read them from Ray's object store; auto (default): on when the images "
                   "take more than half of the driver node's object store")
    p.add_argument("--mlflow", metavar="URI", help="log each trial as a run on this MLflow tracking "
                   "server (parameters, per-epoch metrics, best checkpoint); needs tune_age[mlflow]")
    p.add_argument("--warm-start", metavar="EXP", help="seed the new search's study with the trials of "
                   "an earlier search (its folder) whose configurations fit this space")
    p.set_defaults(func=cmd_search)
    _add_results_commands(sub)
    return parser


def _setup_logging(verbose: bool) -> tuple:
    """Prints tune_age's log lines plainly on stdout; returns what to restore afterwards."""
    root = logging.getLogger("tune_age")
    saved = (list(root.handlers), root.level, root.propagate)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
    if not verbose:
        import os

        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        for name in ("ray", "optuna"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # Ray warns on every start that token authentication is on, as tune_age keeps it; the
        # warning that it is off (RAY_AUTH_MODE=disabled) still shows.
        logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
            lambda record: not record.getMessage().startswith("Token authentication is enabled"))
        # A failed trial's traceback is in its error.txt; tune-age's lines name the error.
        logging.getLogger("ray.tune.execution.tune_controller").addFilter(
            lambda record: not record.getMessage().startswith("Trial task failed for trial"))
        logging.getLogger("ray.tune.tune").addFilter(
            lambda record: not record.getMessage().startswith("Trials did not complete"))
        # Ray's own end-of-run advice (Tuner.restore, metrics it could not fetch from
        # interrupted trials) is replaced by tune-age's summary and resume command.
        logging.getLogger("ray.tune").setLevel(logging.ERROR)
        try:
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)
        except ImportError:
            pass
    return saved


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    # The options given on the command line, not by default (argparse cannot tell them apart).
    args.given = {t[2:].split("=")[0].replace("-", "_") for t in (sys.argv[1:] if argv is None else argv)
                  if t.startswith("--")}
    saved = _setup_logging(args.verbose)
    try:
        return args.func(args)
    except TuneAgeError as exc:
        print(f"tune-age: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\ntune-age: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:  # called in-process (tests, notebooks): leave logging as it was
        root = logging.getLogger("tune_age")
        root.handlers[:], root.propagate = saved[0], saved[2]
        root.setLevel(saved[1])


if __name__ == "__main__":
    raise SystemExit(main())
