"""Data sharing: time from trial start to first batch, object store against decoding per trial.

Two searches through `tune_age.search.run_search` on the same image files (the built-in
faces, 3,000), each K trials of TrainConfig's default model for E epochs, FIFO, no
baseline, the driver's decode cache in a fresh folder:

  1. object store (what tune_age does): the driver decodes the images (the cache is
     empty, so it really decodes) and every trial reads them from Ray's object store.
  2. decode in each trial: every trial ignores what Ray hands it and calls load_data
     itself with its own empty decode cache, as a trainable that loads its own data would.
     The driver still loads the data for the search: the same files, so its cache from
     search 1 must serve it without decoding again - the proof that a second search on
     the same data does not decode (decode calls are counted in the driver, and the
     decode log lines are shown).

A thin wrapper around the trainable (benchmarks/common.py: timed_trainable) timestamps,
inside each trial, its entry and each epoch; "trial start" is the earlier of Ray's
on_trial_start (trials.jsonl) and that entry, "first batch" the start of the first epoch.

    python benchmarks/data_sharing.py              # 4 trials x 3 epochs each (~4 min)
    python benchmarks/data_sharing.py --quick      # 2 trials x 1 epoch, 1,000 faces
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import shutil
import statistics
import sys
import threading
import time

import common


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=4, help="trials per search (default 4)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per trial (default 3)")
    p.add_argument("--synthetic-n", type=int, default=3000, help="built-in faces (default 3000)")
    p.add_argument("--quick", action="store_true", help="2 trials x 1 epoch on 1,000 faces")
    args = p.parse_args(argv)
    if args.quick:
        args.trials, args.epochs, args.synthetic_n = 2, 1, 1000
    return args


def load_own(folder: str, size: int):
    """What a trial that loads its own data does: decode every file, with no cache to help."""
    import tempfile

    from tune_age.config import DataConfig
    from tune_age.data import load_data

    cache = tempfile.mkdtemp(prefix="ta_bench_trial_cache_")
    try:
        return load_data(DataConfig(path=folder, cache_dir=cache), [size], progress=False)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


class DecodeCounter(logging.Handler):
    """Counts decode_one calls in this process and keeps tune_age.data.decode's log lines."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.calls, self.lines = 0, []
        self._lock = threading.Lock()

    def __enter__(self):
        import tune_age.data.decode as decode

        self._module, self._real = decode, decode.decode_one

        def counted(*args, **kwargs):
            with self._lock:
                self.calls += 1
            return self._real(*args, **kwargs)

        decode.decode_one = counted  # decode_images looks it up at call time
        self._logger = logging.getLogger("tune_age.data.decode")
        self._level = self._logger.level
        self._logger.setLevel(logging.INFO)
        self._logger.addHandler(self)
        return self

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def __exit__(self, *exc):
        self._module.decode_one = self._real
        self._logger.removeHandler(self)
        self._logger.setLevel(self._level)


def one_search(name, args, data_cfg, storage, space_file, load=None) -> dict:
    import ray

    import tune_age.search.trainable
    from tune_age.config import SearchConfig
    from tune_age.search import run_search
    from tune_age.search.tracking import read_trials

    search = SearchConfig(space=str(space_file), num_samples=args.trials, max_epochs=args.epochs,
                          scheduler="fifo", baseline_first=False, storage=str(storage), name=name)
    timing = common.fresh_dir("ta_bench_timing_")
    real = tune_age.search.trainable._untimed_train_trial = tune_age.search.trainable.train_trial
    tune_age.search.trainable.train_trial = common.timed_trainable(timing, load=load)
    t0 = time.perf_counter()
    try:
        with DecodeCounter() as counter, common.Sampler() as load_sampler:
            exp = run_search(search, data_cfg, progress=False)
        ray.shutdown()
    finally:
        tune_age.search.trainable.train_trial = real
        del tune_age.search.trainable._untimed_train_trial
    ray_view = {t["trial_id"]: t for t in read_trials(exp / "trials.jsonl").values()}
    trials = []
    for path in sorted(timing.glob("*.json")):
        marks = json.loads(path.read_text())
        started = min(ray_view[path.stem]["started"], marks["entered"])
        ended = max(ray_view[path.stem]["ended"] or marks["ended"], marks["ended"])
        first = marks["epochs"][0][0]
        loaded = marks.get("loaded", marks["entered"])
        trials.append({"to_first": first - started, "trial": ended - started,
                       "share": (first - started) / (ended - started),
                       "ray": marks["entered"] - started, "decode": loaded - marks["entered"],
                       "setup": first - loaded, "pid": marks["pid"], "entered": marks["entered"]})
    seen = set()
    for t in sorted(trials, key=lambda t: t["entered"]):
        t["reused"] = t["pid"] in seen  # Ray reused a worker that had run a trial already
        seen.add(t["pid"])
    return {"trials": trials, "decodes": counter.calls, "lines": counter.lines,
            "wall": time.perf_counter() - t0, "others": load_sampler.others_cores}


def main(argv=None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.WARNING)
    import ray.cloudpickle

    from tune_age.config import DataConfig
    from tune_age.data.synthetic import ensure_synthetic

    ray.cloudpickle.register_pickle_by_value(common)  # trials run common.timed_trainable
    size = 64  # TrainConfig's default image_size
    folder = str(ensure_synthetic(n=args.synthetic_n))  # drawn once (cached); not decoded yet
    work = common.fresh_dir("ta_bench_sharing_")
    space_file = work / "space.yaml"
    space_file.write_text(f"description: data sharing benchmark\nparams:\n  arch: cnn\n  image_size: {size}\n")
    data_cfg = DataConfig(path=folder, cache_dir=str(work / "driver_cache"))  # empty: search 1 decodes
    print(f"{args.trials} trials x {args.epochs} epochs per search, TrainConfig defaults, "
          f"{args.synthetic_n} faces in {folder}; load average {common.load_average()}", flush=True)

    shared = one_search("object-store", args, data_cfg, work / "results", space_file)
    print(f"search 1 (object store): {shared['wall']:.0f} s, others used {shared['others']:.2f} cores",
          flush=True)
    own = one_search("decode-in-trial", args, data_cfg, work / "results", space_file,
                     load=functools.partial(load_own, folder, size))
    print(f"search 2 (each trial decodes): {own['wall']:.0f} s, others used {own['others']:.2f} cores",
          flush=True)

    common.section("trial start -> first batch, per trial: median (min-max, n)")
    print("Ray: on_trial_start to the trainable's first line (worker start and imports for a "
          "worker's first trial, the object-store fetch); decode: load_data inside the trial; "
          "setup: start_run (model, optimizer; a worker's first optimizer imports torch._dynamo)")
    rows = {"object store": shared, "decode in each trial": own}
    for label, r in rows.items():
        t = r["trials"]
        f = lambda key, ts=t: common.spread([x[key] for x in ts])  # noqa: E731
        print(f"{label:>21}: Ray {f('ray')} s + decode {f('decode')} s + setup {f('setup')} s "
              f"= to first batch {f('to_first')} s")
        print(f"{'':>21}  of a {f('trial')} s trial = {common.spread([100 * x['share'] for x in t])} %; "
              f"in a reused worker {common.spread([x['to_first'] for x in t if x['reused']])} s")

    common.section("does a second search on the same data decode again?")
    for i, (label, r) in enumerate(rows.items(), 1):
        print(f"search {i} driver: {r['decodes']} images decoded; log: "
              + " | ".join(r["lines"]) if r["lines"] else "(no decode log line)")
    cached = own["decodes"] == 0 and any("mapped from cache" in line for line in own["lines"])

    share = lambda r: statistics.median(x["share"] for x in r["trials"])  # noqa: E731
    first = lambda r: statistics.median(x["to_first"] for x in r["trials"])  # noqa: E731
    print(f"\nnoise: other processes used {shared['others']:.2f} and {own['others']:.2f} of "
          f"{common.CORES} cores during the two searches")
    print(f"RESULT data sharing: trial start -> first batch, object store {first(shared):.1f} s = "
          f"{share(shared):.1%} of the trial, each trial decoding {first(own):.1f} s = {share(own):.1%} "
          f"({share(own) / max(share(shared), 1e-9):.1f}x); the second search decoded "
          f"{own['decodes']} images (the first {shared['decodes']}): no decoding again: "
          f"{'YES' if cached else 'NO'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
