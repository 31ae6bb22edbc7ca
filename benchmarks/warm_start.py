"""Warm start: how many epochs a new search needs to reach an earlier search's best, cold
against warm-started from that search.

Search A (TPE + ASHA, --trials trials, searcher seed 100) runs on the built-in faces in the
compact space of search_efficiency.py. Then, for each seed, search B on the same data, space
and budget twice: cold, and with `--warm-start A`. Each epoch of each trial becomes one event
at its trial's start + its time_total_s (as in search_efficiency.py); reported per seed: the
epochs B had consumed when one of its trials first reached A's best val_acc less --margin,
and B's own best. Target: warm start needs at most half the cold start's epochs (medians
over seeds; a B that never gets there counts as all its epochs plus one).

    python benchmarks/warm_start.py            # 16 trials x up to 9 epochs, seeds 0,1,2 (~8 min)
    python benchmarks/warm_start.py --quick    # 8 trials x up to 3 epochs, seed 0
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time

import common
from search_efficiency import SPACE, epoch_events, epochs_to_reach

TARGET = 0.5


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=16, help="trials per search (default 16)")
    p.add_argument("--max-epochs", type=int, default=9, help="epochs per trial at most (default 9)")
    p.add_argument("--seeds", default="0,1,2", help="searcher seeds of B (default 0,1,2)")
    p.add_argument("--margin", type=float, default=0.01, help="B reaches A's best less this (default 0.01)")
    p.add_argument("--synthetic-n", type=int, default=3000, help="built-in faces (default 3000)")
    p.add_argument("--quick", action="store_true", help="8 trials x up to 3 epochs, seed 0")
    args = p.parse_args(argv)
    if args.quick:
        args.trials, args.max_epochs, args.seeds = 8, 3, "0"
    return args


def main(argv=None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.WARNING)
    import ray

    from tune_age.config import DataConfig, SearchConfig
    from tune_age.search import run_search, start_ray

    work = common.fresh_dir("ta_bench_warm_")
    space_file = work / "space.yaml"
    space_file.write_text(SPACE.replace("{grace}", "2"))
    data_cfg = DataConfig(synthetic_n=args.synthetic_n)
    from tune_age.data import load_data

    load_data(data_cfg, [32], progress=False)  # drawn and decoded once, before any search
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"{args.trials} trials x up to {args.max_epochs} epochs per search, B seeds {seeds}, "
          f"{args.synthetic_n} faces at 32 px; load average {common.load_average()}", flush=True)
    start_ray(None)

    def search(name: str, seed: int, warm: str | None = None):
        t = time.perf_counter()
        exp = run_search(SearchConfig(space=str(space_file), num_samples=args.trials, max_epochs=args.max_epochs,
                                      baseline_first=False, seed=seed, storage=str(work / "results"),
                                      name=name, warm_start=warm), data_cfg, progress=False)
        events = epoch_events(exp)
        return exp, events, time.perf_counter() - t

    with common.Sampler() as load:
        a_dir, a_events, a_s = search("A", 100)
        a_best = max(acc for _, acc in a_events)
        goal = a_best - args.margin
        print(f"A: best val_acc {a_best:.4f} in {len(a_events)} epochs, {a_s:.0f} s; B's goal {goal:.4f}", flush=True)
        rows = {}
        for i, seed in enumerate(seeds):
            arms = [("cold", None), ("warm", str(a_dir))]
            for arm, warm in (arms if i % 2 == 0 else arms[::-1]):  # alternate who goes first
                _, events, seconds = search(f"B-{arm}-seed{seed}", seed, warm)
                reach = epochs_to_reach(events, goal)
                rows[(arm, seed)] = {"reach": reach, "epochs": len(events),
                                     "best": max(acc for _, acc in events), "seconds": seconds}
                print(f"seed {seed} {arm}: reached the goal after {reach if reach else 'never'} of "
                      f"{len(events)} epochs; best {rows[(arm, seed)]['best']:.4f}; {seconds:.0f} s", flush=True)
    ray.shutdown()

    def cost(row):  # never reaching counts as every epoch it had, plus one
        return row["reach"] if row["reach"] else row["epochs"] + 1

    common.section("per seed")
    print(f"{'seed':>4} {'cold: epochs to goal':>21} {'warm: epochs to goal':>21} {'warm/cold':>10}")
    for seed in seeds:
        c, w = rows[("cold", seed)], rows[("warm", seed)]
        print(f"{seed:>4} {str(c['reach'] or 'never'):>21} {str(w['reach'] or 'never'):>21} "
              f"{cost(w) / cost(c):>10.2f}")
    cold = statistics.median(cost(rows[("cold", s)]) for s in seeds)
    warm = statistics.median(cost(rows[("warm", s)]) for s in seeds)
    ratio = warm / cold
    print(f"noise: other processes used {load.others_cores:.2f} of {common.CORES} cores")
    print(f"RESULT warm start: epochs to reach A's best ({a_best:.4f}) less {args.margin}: cold {cold:g}, "
          f"warm {warm:g} (medians of {len(seeds)} seeds), warm/cold {ratio:.2f} "
          f"(target <= {TARGET}: {common.verdict(ratio <= TARGET)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
