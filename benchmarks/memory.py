"""Memory: peak resident memory of a search on 10,000 images with 1 and with 2 concurrent trials.

Runs the same small search twice through `tune_age.search.run_search` (2 trials of a small
fixed CNN, 1 epoch each, FIFO, no baseline), once with one trial at a time and once with
two at once, each on a fresh local Ray. A sampler process reads /proc/<pid>/smaps_rollup
of the whole process tree every 0.2 s (this driver, Ray's GCS, the raylet, which holds
the object store, and the trial workers) and keeps the peak of the summed PSS.

RSS counts every page a process maps, so a page shared by three processes (the object
store's shared memory, read-only library code) is counted three times in a sum of RSS;
PSS charges each sharer 1/n of it, so the sum of PSS over the tree is the memory the tree
really holds. The images are put into the object store once and every trial maps those
pages (zero-copy numpy); they show up in each worker's RSS but only once in the PSS sum.

The data are the built-in faces at their native 128 px, so the data set (469 MiB) is
larger than a trial worker's own memory and a copy per trial could not hide.

    python benchmarks/memory.py              # 10,000 faces (drawn and decoded once, cached)
    python benchmarks/memory.py --quick      # 2,000 faces
    python benchmarks/memory.py --image-size 64
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time

import common

ROLES = {  # command-line substring -> role, first match wins
    "memory.py": "driver",
    "ray::ImplicitFunc": "trial workers",
    "ray::IDLE": "idle Ray workers",
    "default_worker.py": "idle Ray workers",
    "raylet": "raylet (object store)",
    "gcs_server": "Ray GCS",
    "ray::": "Ray agents",
    "ray/": "other Ray processes",
}
# A small fixed CNN on small batches: 1-epoch trials of seconds whose own memory (torch,
# activations) stays well below the data set's size.
SPACE = """\
description: memory benchmark - one fixed small CNN
params:
  arch: cnn
  image_size: {size}
  conv_layers: 2
  channels: 8
  head: gap
  fc_layers: 1
  batch_size: 32
"""


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--synthetic-n", type=int, default=10000, help="built-in faces (default 10000)")
    p.add_argument("--image-size", default="native",
                   help="pixels, or native (default: native, 128 px for the built-in faces)")
    p.add_argument("--concurrency", default="1,2", help="concurrent trials to compare (default 1,2)")
    p.add_argument("--quick", action="store_true", help="2,000 faces")
    args = p.parse_args(argv)
    if args.quick:
        args.synthetic_n = 2000
    if args.image_size != "native":
        args.image_size = int(args.image_size)
    return args


def warm_cache(n: int, size) -> None:
    """Draws and decodes the faces in a child process, so this driver holds no extra copy."""
    code = ("from tune_age.config import DataConfig; from tune_age.data import load_data; "
            f"d = load_data(DataConfig(synthetic_n={n}), [{size!r}], progress=False); "
            "print(sum(a.nbytes for a in d.images.values()))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return int(out.stdout.split()[-1])


def one_search(args, concurrent: int, storage, space_file) -> tuple[common.Sampler, list[dict]]:
    import ray

    import tune_age.search.trainable
    from tune_age.config import DataConfig, SearchConfig
    from tune_age.search import run_search

    search = SearchConfig(space=str(space_file), num_samples=2, max_epochs=1, scheduler="fifo",
                          baseline_first=False, max_concurrent=concurrent, storage=str(storage),
                          name=f"mem-{concurrent}")
    timing = common.fresh_dir("ta_bench_timing_")
    real = tune_age.search.trainable._untimed_train_trial = tune_age.search.trainable.train_trial
    tune_age.search.trainable.train_trial = common.timed_trainable(timing)  # + memory on entry, after setup
    try:
        before = common.memory_of(os.getpid())  # the driver with torch and Ray imported
        with common.Sampler(interval=0.2, memory=True, roles=ROLES) as s:
            run_search(search, DataConfig(synthetic_n=args.synthetic_n), progress=False)
        s.result["driver_before"] = before
        ray.shutdown()
    finally:
        tune_age.search.trainable.train_trial = real
        del tune_age.search.trainable._untimed_train_trial
    return s, common.read_timings(timing)


def main(argv=None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    data_bytes = warm_cache(args.synthetic_n, args.image_size)
    print(f"data set: {args.synthetic_n} faces at {args.image_size} px = {common.mib(data_bytes)} "
          f"(uint8); ready in {time.perf_counter() - t0:.0f} s; load average {common.load_average()}",
          flush=True)
    work = common.fresh_dir("ta_bench_memory_")
    space_file = work / "space.yaml"
    space_file.write_text(SPACE.format(size=args.image_size))
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(common)  # trials run common.timed_trainable
    results, trials = {}, {}
    for k in [int(c) for c in args.concurrency.split(",")]:
        t = time.perf_counter()
        s, trials[k] = one_search(args, k, work / "results", space_file)
        results[k] = s
        print(f"{k} concurrent trial(s): {time.perf_counter() - t:.0f} s, {s.samples} samples, "
              f"others used {s.others_cores:.2f} of {common.CORES} cores", flush=True)

    common.section("memory at the peak of the PSS sum, by role")
    print("PSS splits each shared page among the processes that map it, so PSS sums to what the "
          "tree really holds; RSS counts a shared page once per process that maps it. shm: the "
          "shared-memory part (the object store, /dev/shm/plasma*); private: pages no other "
          "process maps (the driver's own decoded copy, each worker's torch and activations)")
    for k, s in results.items():
        print(f"-- {k} concurrent trial(s): peak PSS sum {common.mib(s.peak['Pss'])}, "
              f"peak RSS sum {common.mib(s.peak['Rss'])}")
        print(f"   {'role':>22}     {'PSS':>9} {'RSS':>9} {'private':>9} {'shm RSS':>9} {'shm PSS':>9}")
        for role, m in sorted(s.at_peak.items(), key=lambda kv: -kv[1]["Pss"]):
            print(f"   {role:>22} x{m['n']:<2} " + " ".join(
                f"{common.mib(m[key]):>9}" for key in ("Pss", "Rss", "Private", "ShmRss", "ShmPss")))

    common.section("is the data set held once?")
    ks = sorted(results)
    lo, hi = results[ks[0]], results[ks[-1]]
    workers = hi.at_peak.get("trial workers", {"n": 0, "ShmRss": 0, "Private": 0})
    n = max(workers["n"], 1)
    shm_total = sum(m["ShmPss"] for m in hi.at_peak.values())
    added = (hi.peak["Pss"] - lo.peak["Pss"]) / max(ks[-1] - ks[0], 1)
    print(f"object store: {common.mib(shm_total)} of shared memory in all = "
          f"{shm_total / data_bytes:.2f} x the data set")
    print(f"each of the {workers['n']} trial workers maps {common.mib(workers['ShmRss'] / n)} of it "
          f"({workers['ShmRss'] / n / data_bytes:.2f} x the data set: it reads the images in place) "
          f"and holds {common.mib(workers['Private'] / n)} of its own")
    driver = hi.at_peak.get("driver", {"Anon": 0})
    driver_added = driver["Anon"] - hi.driver_before["Anon"]
    print(f"the driver: {common.mib(driver['Anon'])} of anonymous memory (heap, arrays) at the peak, "
          f"{common.mib(hi.driver_before['Anon'])} before the search: +{common.mib(driver_added)} "
          f"= {driver_added / data_bytes:.2f} x the data set (it drops its decoded copy once the "
          f"data are in the object store)")
    # A worker's first trial also imports torch._dynamo (about 70 MiB, once per process); a
    # later trial in the same worker (Ray reuses it) shows what a trial itself adds.
    first, later = [], []
    for ts in trials.values():
        seen = set()
        for t in sorted(ts, key=lambda t: t["entered"]):
            grown = t["memory_setup"]["Private"] - t["memory_entered"]["Private"]
            (later if t["pid"] in seen else first).append(grown)
            seen.add(t["pid"])
    setup = max(later or first)
    print(f"inside the trials: setting up (start_run) added {common.spread([x / 2**20 for x in first], '{:.0f}')} "
          f"MiB of private memory in a worker's first trial, {common.spread([x / 2**20 for x in later], '{:.0f}')} "
          f"MiB in a later trial of the same worker; a copy of the train and val splits would be "
          f"{0.85 * data_bytes / 2**20:.0f} MiB")
    held_once = 0.9 < shm_total / data_bytes < 1.1 and max(setup, driver_added) < 0.5 * data_bytes
    print(f"RESULT memory: data set {common.mib(data_bytes)}; peak PSS {common.mib(lo.peak['Pss'])} "
          f"with {ks[0]} trial(s), {common.mib(hi.peak['Pss'])} with {ks[-1]} (RSS sums "
          f"{common.mib(lo.peak['Rss'])}, {common.mib(hi.peak['Rss'])}): +{common.mib(added)} per extra "
          f"trial = {added / data_bytes:.2f} x the data set (a worker's own torch and activations); object "
          f"store {shm_total / data_bytes:.2f} x the data set, a trial's setup adds "
          f"{setup / data_bytes:.2f} x, the driver {driver_added / data_bytes:.2f} x -> the data set is "
          f"held once, not per trial: "
          f"{'YES' if held_once else 'NO'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
