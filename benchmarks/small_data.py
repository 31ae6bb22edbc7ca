"""Small data on real faces: what each approach gives on photos it never saw.

On real FairFace photos (../shared/data/fairface, CC BY 4.0: Karkkainen & Joo, WACV 2021) at
three training-set sizes drawn from FairFace's train split (about 70, 300 and 1,000 images;
tune_age splits each into train/val/test as it would any folder), every approach is scored on
the same unseen photos from FairFace's val split (--unseen, 1,000 by default), with 95 % Wilson
intervals:

  seed baseline    the original project's configuration (search_spaces/seed_baseline.yaml),
                   `tune-age train`, its best epoch by val_acc
  scratch search   `tune-age search --space quick` (from-scratch CNNs), --budget minutes
  zero-shot        the face network's own age head read as the groups, no training at all
  linear probe     a linear head on the frozen face network (face_resnet), fixed settings
  small search     `tune-age search --space small` (heads on frozen face features), the same
                   --budget minutes

Searches choose their configuration on validation (cross-validated where the validation split
holds fewer than 200 images, as tune-age does by itself) and are exported with
`tune-age export --refit` (the configuration retrained on train+val); the seed baseline and the
probe are single `tune-age train` runs, their best epoch chosen on the validation split.
Then the speed of frozen-feature trials against fine-tuning trials of the same backbone
(face_resnet, 1,000 images, one thread each as a trial gets): trials per minute of each.

    python benchmarks/small_data.py                  # sizes 70 300 1000, 3-minute searches (~30 min)
    python benchmarks/small_data.py --quick          # 70 images, 1-minute searches, 300 unseen

Targets: on 70 and 300 images the small search beats the linear probe and beats the scratch
search by at least 0.15 accuracy; frozen-feature trials run at least 20x as many per minute.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

import common

ROOT = Path(__file__).resolve().parents[1]
FAIRFACE = ROOT.parent / "shared" / "data" / "fairface"
BINS = "fairface"


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[70, 300, 1000])
    p.add_argument("--unseen", type=int, default=1000, help="unseen photos from FairFace's val split")
    p.add_argument("--budget", type=float, default=3.0, help="minutes per search")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="70 images, 1-minute searches, 300 unseen photos")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.budget, args.unseen = [70], 1.0, 300
    return args


def link_folder(dest: Path, rows: pd.DataFrame) -> Path:
    """A folders-layout data set (one sub-folder per age group) of symlinks to the photos."""
    for _, r in rows.iterrows():
        folder = dest / r.age_group
        folder.mkdir(parents=True, exist_ok=True)
        (folder / Path(r.path).name).symlink_to(FAIRFACE / r.path)
    return dest


def score(model_path: Path, unseen: Path) -> dict:
    from tune_age.results.intervals import wilson
    from tune_age.results.predict import evaluate

    m = evaluate(model_path, unseen, device="cpu")
    low, high = wilson(m["accuracy"], m["n_images"])
    return {"acc": m["accuracy"], "lo": low, "hi": high, "one_off": m["one_off"],
            "one_lo": wilson(m["one_off"], m["n_images"])[0], "one_hi": wilson(m["one_off"], m["n_images"])[1],
            "n": m["n_images"]}


def train_one(cfg, data_dir: Path, out: Path) -> Path:
    from tune_age.config import DataConfig
    from tune_age.data import load_data
    from tune_age.training import train

    data = load_data(DataConfig(path=str(data_dir), bins=BINS), [cfg.image_size], progress=False)
    train(cfg, data, out)
    return out / "best.pt"


def zero_shot(data_dir: Path, out: Path) -> Path:
    """The face network's own answer, untrained: its age head read as the groups (age_head)."""
    from tune_age.config import DataConfig, TrainConfig
    from tune_age.data import load_data
    from tune_age.training import checkpoint_state, save_atomic, start_run

    cfg = TrainConfig(arch="face_resnet", pretrained=True, age_head=True, freeze="head_only", flip=False,
                      image_size=64)
    data = load_data(DataConfig(path=str(data_dir), bins=BINS), [64], progress=False)
    save_atomic(checkpoint_state(start_run(cfg, data)), out / "zero_shot.pt")
    return out / "zero_shot.pt"


def search_one(space: str, data_dir: Path, storage: Path, name: str, budget: float, seed: int) -> tuple[Path, dict]:
    from tune_age.config import DataConfig, SearchConfig
    from tune_age.results import load_experiment
    from tune_age.results.export import export_best
    from tune_age.search import run_search

    search = SearchConfig(space=space, storage=str(storage), name=name, time_budget_min=budget,
                          num_samples=200, seed=seed)
    exp = run_search(search, DataConfig(path=str(data_dir), bins=BINS), progress=False)
    out = storage / f"{name}.pt"
    export_best(exp, out, refit=True)  # what a user with little data exports: train+val, refit
    e = load_experiment(exp)
    return out, {"trials": len(e.trials), "folds": e.meta["cv"]["folds"]}


def trials_per_minute(data_dir: Path, epochs: int = 3) -> tuple[float, float]:
    """(frozen-feature head trials, fine-tuning trials) per minute, face_resnet, one thread."""
    from tune_age.config import DataConfig, TrainConfig
    from tune_age.data import load_data
    from tune_age.training import run_epoch, start_run

    torch.set_num_threads(1)
    data = load_data(DataConfig(path=str(data_dir), bins=BINS, val_fraction=0.15), [64], progress=False)
    head = TrainConfig(arch="face_resnet", pretrained=True, freeze="head_only", flip=False, image_size=64,
                       epochs=epochs, device="cpu")
    start_run(head, data)  # fills the feature cache, as the first trial of a search does
    rates = []
    for cfg in (head, head.replace(freeze="none", flip=True)):
        t = time.perf_counter()
        run = start_run(cfg, data)
        for _ in range(epochs):
            run_epoch(run)
        rates.append(60.0 / (time.perf_counter() - t))
    return rates[0], rates[1]


def main(argv=None) -> int:
    args = parse(argv)
    if not (FAIRFACE / "labels.csv").is_file():
        print(f"needs {FAIRFACE} (FairFace photos); not found", file=sys.stderr)
        return 2
    from tune_age.config import TrainConfig
    from tune_age.search.spaces import seed_baseline

    table = pd.read_csv(FAIRFACE / "labels.csv")
    train_pool = table[table.split == "train"].sample(frac=1.0, random_state=args.seed)
    unseen_rows = table[table.split == "val"].sample(args.unseen, random_state=args.seed)
    work = Path(tempfile.mkdtemp(prefix="small_data_"))
    os.environ.setdefault("TUNE_AGE_CACHE", str(work / "cache"))
    unseen = link_folder(work / "unseen", unseen_rows)
    print(f"FairFace: {len(unseen_rows)} unseen photos from its val split; sizes {args.sizes}; "
          f"searches {args.budget:g} min each; {common.CORES} cores; load average {common.load_average()}",
          flush=True)
    probe_cfg = TrainConfig(arch="face_resnet", pretrained=True, freeze="head_only", flip=False, image_size=64,
                            lr=0.01, weight_decay=1e-3, dropout=0.2, batch_size=32, epochs=40)
    rows = []
    first = link_folder(work / f"train{args.sizes[0]}", train_pool.head(args.sizes[0]))
    s = score(zero_shot(first, work), unseen)
    print(f"  zero-shot face network (no training): accuracy {s['acc']:.3f} [{s['lo']:.3f}, {s['hi']:.3f}]  "
          f"one-off {s['one_off']:.3f} [{s['one_lo']:.3f}, {s['one_hi']:.3f}]", flush=True)
    for size in args.sizes:
        data_dir = work / f"train{size}"
        if not data_dir.exists():
            link_folder(data_dir, train_pool.head(size))
        found = {}
        t = time.perf_counter()
        found["seed baseline"] = (train_one(seed_baseline().replace(epochs=8), data_dir, work / f"base{size}"), {})
        found["seed baseline"][1]["seconds"] = time.perf_counter() - t
        t = time.perf_counter()
        found["linear probe"] = (train_one(probe_cfg, data_dir, work / f"probe{size}"), {})
        found["linear probe"][1]["seconds"] = time.perf_counter() - t
        for label, space in (("scratch search", "quick"), ("small search", "small")):
            t = time.perf_counter()
            path, info = search_one(space, data_dir, work / "results", f"{space}{size}", args.budget, args.seed)
            info["seconds"] = time.perf_counter() - t
            found[label] = (path, info)
        for label, (path, info) in found.items():
            s = score(path, unseen)
            rows.append({"size": size, "approach": label, **s, **info})
            extra = f", {info['trials']} trials, {info['folds']} folds" if "trials" in info else ""
            print(f"  {size:>5} images  {label:<15} accuracy {s['acc']:.3f} [{s['lo']:.3f}, {s['hi']:.3f}]  "
                  f"one-off {s['one_off']:.3f} [{s['one_lo']:.3f}, {s['one_hi']:.3f}]  "
                  f"({info['seconds']:.0f} s{extra})", flush=True)

    common.section("accuracy on the same unseen photos (95 % Wilson intervals)")
    frame = pd.DataFrame(rows)
    print(frame[["size", "approach", "acc", "lo", "hi", "one_off", "seconds"]].to_string(index=False,
                                                                                         float_format="%.3f"))
    heads, tunes = trials_per_minute(work / f"train{max(args.sizes)}")
    print(f"\nface_resnet trials of 3 epochs on {max(args.sizes)} images, one thread: frozen-feature "
          f"{heads:.1f} per minute, fine-tuning {tunes:.2f} per minute: {heads / tunes:.0f}x")
    verdicts = []
    for size in [s for s in args.sizes if s <= 300]:
        by = frame[frame["size"] == size].set_index("approach")["acc"]
        verdicts.append(by["small search"] > by["linear probe"])
        verdicts.append(by["small search"] - by["scratch search"] >= 0.15)
    print("RESULT small_data: " + "; ".join(
        f"{s}: small {frame[(frame['size'] == s) & (frame.approach == 'small search')].acc.iloc[0]:.3f}, "
        f"probe {frame[(frame['size'] == s) & (frame.approach == 'linear probe')].acc.iloc[0]:.3f}, "
        f"scratch {frame[(frame['size'] == s) & (frame.approach == 'scratch search')].acc.iloc[0]:.3f}, "
        f"baseline {frame[(frame['size'] == s) & (frame.approach == 'seed baseline')].acc.iloc[0]:.3f}"
        for s in args.sizes)
        + f"; head trials {heads / tunes:.0f}x per minute (target >= 20: {common.verdict(heads / tunes >= 20)}); "
          f"accuracy targets on <= 300 images: {common.verdict(all(verdicts))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
