"""Orchestration overhead: the same K trials through `run_search` and through plain processes.

K identical trials of TrainConfig's default model for E epochs on the built-in faces
(3,000), data decoded once (cached) before both sides:

  (a) tune_age: `tune_age.search.run_search` with a space whose parameters are all fixed,
      FIFO, no seed baseline; timed from calling it (Ray not started) to after
      `ray.shutdown()`, so it includes loading the data from the cache and Ray's start (which
      run_search overlaps), trial start, per-epoch checkpoints and reports, and shutdown.
  (b) plain: the same number of processes as the search runs trials at once
      (multiprocessing, spawn) with the same process settings as a trial (torch threads,
      tune_age.training.TRIAL_PROCESS_ENV, and on the CPU keep_freed_memory), each trial a
      hand-written PyTorch loop (benchmarks/common.py) on the same model in the same memory
      format, evaluating on the validation split after every epoch; timed from starting
      the pool to its end.

Ratio a/b; target <= 1.10 for 8 trials x 3 epochs, goal 1.05. Then where a's extra time goes: Ray's
start and shutdown, the time before the first trial, each trial's start, the per-epoch
reporting and checkpointing, and how much slower the training epochs themselves ran
(Ray's own processes share the CPU).

    python benchmarks/overhead.py                 # 8 trials x 3 epochs, b then a (5-9.5 min)
    python benchmarks/overhead.py --repeats 3     # b a, a b, b a: medians (15-28 min)
    python benchmarks/overhead.py --quick         # 4 trials x 1 epoch
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import statistics
import sys
import time

import common

TARGET, GOAL = 1.10, 1.05
ROLES = {  # command-line substring -> role, first match wins (common.Sampler)
    "overhead.py": "driver",
    "ray::ImplicitFunc": "trials",
    "python from": "trials",  # spawn children: python -c "from multiprocessing.spawn import ..."
    "ray": "Ray's own processes",
}
SPACE = """\
description: overhead benchmark - TrainConfig's defaults, nothing searched
params:
  arch: cnn
  image_size: 64
  batch_size: 64
"""
_WORKER: dict = {}


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=8, help="trials (default 8)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per trial (default 3)")
    p.add_argument("--synthetic-n", type=int, default=3000, help="built-in faces (default 3000)")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs of each side, alternating which goes first (default 1)")
    p.add_argument("--quick", action="store_true", help="4 trials x 1 epoch")
    args = p.parse_args(argv)
    if args.quick:
        args.trials, args.epochs = 4, 1
    return args


# --- (b): plain processes ------------------------------------------------------------------


def _init_worker(arrays: dict, threads: int, channels_last: bool) -> None:
    import torch

    from tune_age.training import keep_freed_memory

    # A trial's process settings (start_run sets the malloc one on the CPU), so that (b)
    # differs from (a) by the orchestration alone.
    torch.set_num_threads(threads)
    keep_freed_memory()
    _WORKER.update({k: torch.from_numpy(v) for k, v in arrays.items()}, channels_last=channels_last)


def plain_trial(epochs: int) -> dict:
    """One trial as a hand-written script would run it; returns its timings."""
    import torch

    from tune_age.config import TrainConfig
    from tune_age.models import build_model

    entered = time.time()
    w = _WORKER
    cfg = TrainConfig(epochs=epochs)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, int(w["classes"]), cfg.image_size)
    if w["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    gen = torch.Generator().manual_seed(cfg.seed)
    marks = {"entered": entered, "epochs": [], "train_s": [], "pid": os.getpid()}
    for _ in range(epochs):
        t = time.time()
        common.plain_train_epoch(model, w["train_x"], w["train_y"], opt, w["mean"], w["std"],
                                 cfg.batch_size, gen)
        sched.step()
        marks["train_s"].append(time.time() - t)
        marks["val_acc"] = common.plain_evaluate(model, w["val_x"], w["val_y"], w["mean"], w["std"])
        marks["epochs"].append((t, time.time()))
    marks["ended"] = time.time()
    return marks


def run_plain(args, data, slots: int, threads: int, channels_last: bool) -> dict:
    import numpy as np

    mean, std = common.norm_tensors(data)
    arrays = {"mean": mean.numpy(), "std": std.numpy(), "classes": np.array(len(data.groups))}
    for name in ("train", "val"):
        rows = data.splits[name]
        arrays[f"{name}_x"], arrays[f"{name}_y"] = data.images[64][rows], data.labels[rows]
    from tune_age.training import TRIAL_PROCESS_ENV

    saved = {k: os.environ.get(k) for k in TRIAL_PROCESS_ENV}
    os.environ.update(TRIAL_PROCESS_ENV)  # a trial worker's environment (malloc), read at exec
    try:
        t0 = time.time()
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(slots, _init_worker, (arrays, threads, channels_last)) as pool:
            trials = pool.map(plain_trial, [args.epochs] * args.trials, chunksize=1)
        t1 = time.time()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return {"wall": t1 - t0, "trials": trials,
            "parts": phases(trials, slots, start=t0, end=t1)}


# --- (a): through run_search ------------------------------------------------------------------


def run_tune(args, storage, space_file, name: str, slots: int) -> dict:
    import ray

    import tune_age.search
    import tune_age.search.trainable
    from tune_age.config import DataConfig, SearchConfig
    from tune_age.search import run_search

    search = SearchConfig(space=str(space_file), num_samples=args.trials, max_epochs=args.epochs,
                          scheduler="fifo", baseline_first=False, storage=str(storage), name=name)
    timing = common.fresh_dir("ta_bench_timing_")
    real = tune_age.search.trainable._untimed_train_trial = tune_age.search.trainable.train_trial
    tune_age.search.trainable.train_trial = common.timed_trainable(timing)
    real_start, ray_start = tune_age.search.start_ray, []

    def start_ray(*a, **kw):  # run_search starts Ray while a thread loads the data: how long?
        ray_start.append(time.time())
        real_start(*a, **kw)
        ray_start.append(time.time())

    tune_age.search.start_ray = start_ray
    try:
        t0 = time.time()
        run_search(search, DataConfig(synthetic_n=args.synthetic_n), progress=False)
        t_search = time.time()
        ray.shutdown()
        t_end = time.time()
    finally:
        tune_age.search.trainable.train_trial = real
        del tune_age.search.trainable._untimed_train_trial
        tune_age.search.start_ray = real_start
    parts = {**phases(common.read_timings(timing), slots, t0, t_search), "ray.shutdown": t_end - t_search}
    return {"wall": t_end - t0, "parts": parts, "ray_start": ray_start[1] - ray_start[0]}


def phases(trials: list[dict], slots: int, start: float, end: float) -> dict:
    """Wall time split into phases; what happens inside trials is summed and divided by slots."""
    per_slot = lambda xs: sum(xs) / slots  # noqa: E731
    epochs = [e for t in trials for e in t["epochs"]]
    out = {
        "until the first trial runs": min(t["entered"] for t in trials) - start,
        "trial setup (to first epoch)": per_slot(t["epochs"][0][0] - t["entered"] for t in trials),
        "epochs (train + evaluate)": per_slot(b - a for a, b in epochs),
    }
    if any(t.get("reports") for t in trials):
        out["checkpoint (state + torch.save)"] = per_slot(
            r[0] - e[1] for t in trials for e, r in zip(t["epochs"], t["reports"]))
        out["tune.report"] = per_slot(b - a for t in trials for a, b in t["reports"])
        out["trial end (after last report)"] = per_slot(t["ended"] - t["reports"][-1][1] for t in trials)
    out["between trials in a slot"] = common.slot_gaps(trials) / slots
    out["after the last trial"] = end - max(t["ended"] for t in trials)
    return out


def main(argv=None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.WARNING)
    import torch

    from tune_age.config import DataConfig, SearchConfig, TrainConfig
    from tune_age.data import load_data
    from tune_age.search import local_resources, plan_resources, trial_slots
    from tune_age.training import start_run

    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(common)  # trials run common.timed_trainable
    data = load_data(DataConfig(synthetic_n=args.synthetic_n), [64], progress=False)  # decoded once
    cpus, gpus = plan_resources(SearchConfig(), local_resources())
    slots = trial_slots(cpus, gpus, local_resources(), None)
    threads = max(1, int(cpus))
    channels_last = start_run(TrainConfig(), data, torch.device("cpu")).model.features[0].weight.is_contiguous(
        memory_format=torch.channels_last)
    work = common.fresh_dir("ta_bench_overhead_")
    space_file = work / "space.yaml"
    space_file.write_text(SPACE)
    print(f"{args.trials} trials x {args.epochs} epochs, TrainConfig defaults, {data.source}; "
          f"{slots} at once, {threads} thread(s) each; load average {common.load_average()}", flush=True)

    plain, tune = [], []
    for rep in range(args.repeats):
        for side in (("b", "a") if rep % 2 == 0 else ("a", "b")):
            with common.Sampler(roles=ROLES) as s:
                if side == "a":
                    r = run_tune(args, work / "results", space_file, f"overhead-{rep}", slots)
                else:
                    r = run_plain(args, data, slots, threads, channels_last)
            r["others"] = s.others_cores
            r["cpu"] = s.cpu_by_role
            (tune if side == "a" else plain).append(r)
            print(f"run {rep + 1} ({side}) {'tune_age' if side == 'a' else 'plain'}: {r['wall']:.1f} s; "
                  f"others used {s.others_cores:.2f} of {common.CORES} cores", flush=True)

    common.section(f"where the time goes (s, medians over repeats; inside trials: summed / {slots} slots)")
    names = list(dict.fromkeys([*tune[0]["parts"], *plain[0]["parts"]]))
    print(f"{'':>34} {'(a) tune_age':>13} {'(b) plain':>10} {'a - b':>8}")
    for name in names:
        a = [r["parts"][name] for r in tune if name in r["parts"]]
        b = [r["parts"][name] for r in plain if name in r["parts"]]
        ma = statistics.median(a) if a else 0.0
        mb = statistics.median(b) if b else 0.0
        print(f"{name:>34} {ma:13.1f} {mb:10.1f} {ma - mb:+8.1f}")
    print(f"(a)'s first row holds loading the data (from the cache) and Ray's start, which overlap: "
          f"Ray took {common.spread([r['ray_start'] for r in tune])} s")
    b_train = [x for r in plain for t in r["trials"] for x in t["train_s"]]
    print(f"b's training epoch alone: {common.spread(b_train)} s")
    common.section("CPU seconds by process, medians over repeats (what competes with the trials)")
    roles = list(dict.fromkeys([*ROLES.values(), "other"]))
    print(f"{'':>34} {'(a) tune_age':>13} {'(b) plain':>10}")
    for role in roles:
        a = statistics.median(r["cpu"].get(role, 0.0) for r in tune)
        b = statistics.median(r["cpu"].get(role, 0.0) for r in plain)
        if a or b:
            print(f"{role:>34} {a:13.1f} {b:10.1f}")

    a_wall = [r["wall"] for r in tune]
    b_wall = [r["wall"] for r in plain]
    ratios = [a["wall"] / b["wall"] for a, b in zip(tune, plain)]
    ratio = statistics.median(a_wall) / statistics.median(b_wall)
    common.section("orchestration overhead")
    print(f"noise: other processes used {common.spread([r['others'] for r in tune + plain], '{:.2f}')} "
          f"of {common.CORES} cores; per-repeat a/b {common.spread(ratios, '{:.3f}')}")
    print(f"(a) tune_age run_search: {common.spread(a_wall)} s; (b) plain processes: {common.spread(b_wall)} s")
    print(f"RESULT overhead: {args.trials} trials x {args.epochs} epochs, {slots} at once: "
          f"(a) {statistics.median(a_wall):.1f} s, (b) {statistics.median(b_wall):.1f} s, a/b = {ratio:.3f}  "
          f"(target <= {TARGET}: {common.verdict(ratio <= TARGET)}; goal <= {GOAL}: {common.verdict(ratio <= GOAL)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
