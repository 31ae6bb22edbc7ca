"""Search efficiency: TPE + ASHA against random search + FIFO, same space, trials and epochs.

Both searches run through `tune_age.search.run_search` on the same space (compact CNNs at
32 px, below), the same number of trials and the same maximum epochs per trial, no seed
baseline, on 1,500 built-in faces, for 3 searcher seeds each (one Ray instance for all).
For each search, from its trial log (trials.jsonl: when each trial started) and each
trial's result.json (one row per epoch: val_acc and time_total_s), every epoch becomes one
event at started + time_total_s; in time order, the running count of events is the number
of epochs the search had consumed. Reported per seed:

  - the best val_acc each search reached and the epochs it consumed in all;
  - the epochs TPE + ASHA had consumed when it first reached random + FIFO's final best
    (same seed index), as a fraction of random + FIFO's epochs. The arms' searcher seeds
    differ (random + FIFO's is the seed + 1000), so they share no startup trials. Target: at most 0.40 (the median
    over seeds).

    python benchmarks/search_efficiency.py            # 16 trials x up to 9 epochs, 3 seeds (~6 min)
    python benchmarks/search_efficiency.py --quick    # 8 trials x up to 3 epochs, 2 seeds
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time

import common

TARGET = 0.40
# Cheap models (8-16 channels at 32 px, about 1 s an epoch) and a space with clear ways to
# fail (a flatten head on faces that move, no batch-norm, SGD at a low learning rate).
SPACE = """\
description: search efficiency benchmark - compact CNNs at 32 px
search:
  grace_period: {grace}
  reduction_factor: 3
params:
  arch: cnn
  image_size: 32
  conv_layers: {int: [2, 4]}
  channels: {choice: [8, 16]}
  batch_norm: {choice: [true, false]}
  head: {choice: [gap, flatten]}
  fc_layers: 1
  dropout: {uniform: [0.0, 0.5]}
  optimizer: {choice: [adam, adamw, sgd]}
  lr: {loguniform: [1.0e-4, 3.0e-2]}
  momentum: {uniform: [0.8, 0.98], when: {optimizer: sgd}}
  weight_decay: {loguniform: [1.0e-6, 1.0e-2]}
  schedule: cosine
  batch_size: {choice: [32, 64, 128]}
  flip: true
"""
KINDS = {"random + FIFO": ("random", "fifo"), "TPE + ASHA": ("tpe", "asha")}
# TPE's first trials are random draws from its seed: with the random arm on the same seed,
# both arms would begin with the same configurations, which flatters the comparison.
ARM_SEED = {"random + FIFO": 1000, "TPE + ASHA": 0}


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=16, help="trials per search (default 16)")
    p.add_argument("--max-epochs", type=int, default=9, help="epochs per trial at most (default 9)")
    p.add_argument("--seeds", default="0,1,2", help="searcher seeds (default 0,1,2)")
    p.add_argument("--grace-period", type=int, default=2,
                   help="ASHA's first rung in epochs (default 2, as in the quick space; at 1, ASHA "
                        "keeps the models that predict the majority group and stops the learners)")
    p.add_argument("--synthetic-n", type=int, default=3000, help="built-in faces (default 3000)")
    p.add_argument("--quick", action="store_true", help="8 trials x up to 3 epochs, seeds 0,1")
    args = p.parse_args(argv)
    if args.quick:
        args.trials, args.max_epochs, args.seeds = 8, 3, "0,1"
    return args


def epoch_events(exp_dir) -> list[tuple[float, float]]:
    """(time, val_acc) of every epoch every trial reported, in time order."""
    from tune_age.results import load_experiment

    exp = load_experiment(exp_dir)
    events = []
    for entry in exp.trials.values():
        for row in exp.history(entry):
            if row.get("diverged") or row.get("val_acc") is None:
                events.append((entry["started"] + row.get("time_total_s", 0.0), float("-inf")))
            else:
                events.append((entry["started"] + row["time_total_s"], float(row["val_acc"])))
    return sorted(events)


def epochs_to_reach(events: list[tuple[float, float]], goal: float) -> int | None:
    for count, (_, acc) in enumerate(events, 1):
        if acc >= goal:
            return count
    return None


def main(argv=None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.WARNING)
    import ray

    from tune_age.config import DataConfig, SearchConfig
    from tune_age.data import load_data
    from tune_age.search import run_search, start_ray

    data_cfg = DataConfig(synthetic_n=args.synthetic_n)
    load_data(data_cfg, [32], progress=False)  # drawn and decoded once, before any search
    work = common.fresh_dir("ta_bench_efficiency_")
    space_file = work / "space.yaml"
    space_file.write_text(SPACE.replace("{grace}", str(args.grace_period)))
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"{args.trials} trials x up to {args.max_epochs} epochs per search, seeds {seeds}, "
          f"{args.synthetic_n} faces at 32 px, ASHA grace period {args.grace_period}, reduction "
          f"factor 3; load average {common.load_average()}", flush=True)

    start_ray(None)  # one Ray for every search
    results: dict[tuple[str, int], dict] = {}
    with common.Sampler() as load:
        for i, seed in enumerate(seeds):
            kinds = list(KINDS) if i % 2 == 0 else list(reversed(KINDS))  # alternate who goes first
            for kind in kinds:
                searcher, scheduler = KINDS[kind]
                name = f"{searcher}-{scheduler}-seed{seed}"
                t = time.perf_counter()
                exp = run_search(SearchConfig(space=str(space_file), num_samples=args.trials,
                                              max_epochs=args.max_epochs, searcher=searcher,
                                              scheduler=scheduler, baseline_first=False, seed=seed + ARM_SEED[kind],
                                              storage=str(work / "results"), name=name),
                                 data_cfg, progress=False)
                events = epoch_events(exp)
                results[(kind, seed)] = {"events": events, "best": max(a for _, a in events),
                                         "epochs": len(events), "seconds": time.perf_counter() - t}
                r = results[(kind, seed)]
                print(f"seed {seed} {kind}: best val_acc {r['best']:.4f}, {r['epochs']} epochs, "
                      f"{r['seconds']:.0f} s", flush=True)
    ray.shutdown()

    common.section("per seed")
    print(f"{'seed':>4} {'random+FIFO best':>17} {'epochs':>7} {'TPE+ASHA best':>14} {'epochs':>7} "
          f"{'TPE+ASHA epochs to reach random+FIFO best':>42}")
    fractions = []
    for seed in seeds:
        rf, ta = results[("random + FIFO", seed)], results[("TPE + ASHA", seed)]
        reach = epochs_to_reach(ta["events"], rf["best"])
        frac = reach / rf["epochs"] if reach is not None else float("inf")
        fractions.append(frac)
        shown = f"{reach} = {frac:.2f} of {rf['epochs']}" if reach is not None else "never"
        print(f"{seed:>4} {rf['best']:>17.4f} {rf['epochs']:>7} {ta['best']:>14.4f} {ta['epochs']:>7} {shown:>42}")
    median_rf = statistics.median(results[("random + FIFO", s)]["best"] for s in seeds)
    against_median = [epochs_to_reach(results[("TPE + ASHA", s)]["events"], median_rf) for s in seeds]

    common.section("search efficiency")
    for kind in KINDS:
        rs = [results[(kind, s)] for s in seeds]
        print(f"{kind:>14}: best val_acc {common.spread([r['best'] for r in rs], '{:.4f}')}, epochs "
              f"{common.spread([r['epochs'] for r in rs], '{:.0f}')}, wall {common.spread([r['seconds'] for r in rs], '{:.0f}')} s")
    print(f"TPE + ASHA epochs to reach the median random + FIFO best ({median_rf:.4f}): "
          + ", ".join("never" if e is None else str(e) for e in against_median))
    print(f"noise: other processes used {load.others_cores:.2f} of {common.CORES} cores (load changes "
          "wall times, and with trials running in parallel it can change the order in which they "
          "finish, so what TPE has seen when it suggests the next trial and which trials ASHA compares)")
    med = statistics.median(fractions)
    rf_epochs = statistics.median(results[("random + FIFO", s)]["epochs"] for s in seeds)
    ta_epochs = statistics.median(results[("TPE + ASHA", s)]["epochs"] for s in seeds)
    print(f"RESULT search efficiency: best val_acc random+FIFO {median_rf:.4f} in {rf_epochs:.0f} epochs, "
          f"TPE+ASHA {statistics.median(results[('TPE + ASHA', s)]['best'] for s in seeds):.4f} in "
          f"{ta_epochs:.0f} epochs (medians of {len(seeds)} seeds); TPE+ASHA reached random+FIFO's final "
          f"best after {', '.join('never' if f == float('inf') else f'{f:.2f}' for f in fractions)} of "
          f"its epochs (median {med:.2f}; target <= {TARGET}: {common.verdict(med <= TARGET)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
