"""Out of core: a search whose decoded images are at least twice the object store it is given.

The built-in faces (N at S px, drawn once and cached), and two searches of the same fixed
small CNN through `tune_age.search.run_search`, each 2 trials at once (1 CPU each) for E
epochs, FIFO, no baseline, on a local Ray that this script starts:

  (a) out of core: Ray's object store given data / 2.5 (at least Ray's minimum, 75 MiB)
      and --memory-map auto, which must choose to map the decode cache: the trials map the
      driver's file; the decode cache is empty before it, so its driver decodes;
  (b) in memory: Ray's default object store (30 % of this machine's memory, room for the
      data) and --memory-map off: the images go through the object store, as before.

Figures: images decoded by each driver (decode_one calls; (b) must map (a)'s cache, 0);
where each trial's images came from (`images_from`); peak memory of the whole process tree
(the driver, Ray's processes, the trial workers), sampled every 0.2 s from
/proc/PID/smaps_rollup: the PSS sum, and the PSS sum less mapped files ("held": anonymous
and shared memory, the object store included, which the kernel cannot drop without swap;
the mapped cache's pages are page cache, which it drops and reads again under pressure);
epoch speed: the trials' training images per second (every epoch's images_per_sec).

Targets: both searches finish; the data are decoded once; (a)'s peak held memory is below
the data size; (a)'s epochs run at >= 0.8x the images per second of (b)'s.

    python benchmarks/out_of_core.py               # 64,000 faces at 128 px (2.9 GiB), 1 epoch (~16 min)
    python benchmarks/out_of_core.py --quick       # 3,000 faces at 96 px: a smoke run, not the target

The data must be large beside what the processes hold anyway, about 2.1 GiB here: the
driver ~0.5 GiB (torch, Ray and pandas imported), each trial worker ~0.65 GiB at 128 px
(torch, and a batch's activations, which grow with the pixels: ~1.25 GiB at 224 px), Ray's
own processes ~0.3 GiB. Hence many faces at 128 px rather than fewer, larger ones.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time

import common

SPEED_TARGET = 0.8
ROLES = {
    "out_of_core.py": "driver",
    "ray::ImplicitFunc": "trial workers",
    "ray::IDLE": "idle Ray workers",
    "default_worker.py": "idle Ray workers",
    "raylet": "raylet",
    "gcs_server": "Ray GCS",
    "ray": "Ray's other processes",
}
SPACE = """\
description: out-of-core benchmark - a small fixed CNN at {size} px
params:
  arch: cnn
  image_size: {size}
  conv_layers: 3
  channels: 8
  channel_growth: 2.0
  batch_norm: true
  head: gap
  fc_layers: 1
  batch_size: 32
  lr: 3.0e-3
"""


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--synthetic-n", type=int, default=64000, help="built-in faces (default 64000)")
    p.add_argument("--image-size", type=int, default=128, help="pixels (default 128, the faces' own)")
    p.add_argument("--epochs", type=int, default=1, help="epochs per trial (default 1)")
    p.add_argument("--quick", action="store_true", help="3,000 faces at 96 px, 1 epoch")
    p.add_argument("--keep", action="store_true", help="keep the drawn faces and the decode cache")
    args = p.parse_args(argv)
    if args.quick:
        args.synthetic_n, args.image_size, args.epochs = 3000, 96, 1
    return args


def one_search(args, name: str, work, store_bytes: int | None, memory_map: str) -> dict:
    """One search on a fresh local Ray; its decodes, trials, memory peaks and seconds."""
    import ray

    import tune_age.data.decode as decode
    from tune_age.config import DataConfig, SearchConfig
    from tune_age.search import run_search
    from tune_age.training import TRIAL_PROCESS_ENV

    calls = [0]
    real = decode.decode_one

    def counted(*a, **k):
        calls[0] += 1
        return real(*a, **k)

    decode.decode_one = counted  # decode_images looks it up at call time
    search = SearchConfig(space=str(work / "space.yaml"), num_samples=2, max_epochs=args.epochs,
                          scheduler="fifo", baseline_first=False, max_concurrent=2, cpus_per_trial=1,
                          cv=1, storage=str(work / "results"), name=name, memory_map=memory_map)
    started = time.perf_counter()
    try:
        with common.Sampler(interval=0.2, memory=True, roles=ROLES) as s:
            # run_search's own start, with the object store this side is given
            ray.init(address="local", include_dashboard=False, log_to_driver=False,
                     object_store_memory=store_bytes, runtime_env={"env_vars": dict(TRIAL_PROCESS_ENV)},
                     _system_config={"prestart_worker_first_driver": False})
            store = ray.cluster_resources().get("object_store_memory", 0)
            run_search(search, DataConfig(synthetic_n=args.synthetic_n), progress=False)
            ray.shutdown()
    finally:
        decode.decode_one = real
    trials = []
    for line in (work / "results" / name / "trials.jsonl").read_text().splitlines():
        t = json.loads(line)
        speeds = []
        result = work / "results" / name / t["dir"] / "result.json"
        for row in result.read_text().splitlines() if result.is_file() else []:
            r = json.loads(row)
            if r.get("images_per_sec"):
                speeds.append(r["images_per_sec"])
        trials.append({"status": t["status"], "epochs": t["epochs"], "speeds": speeds,
                       "from": t.get("last", {}).get("images_from", "?")})
    return {"decoded": calls[0], "trials": trials, "peak": s.peak, "at_peak": s.at_peak, "store": store,
            "seconds": time.perf_counter() - started}


def main(argv=None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.WARNING)
    work = common.fresh_dir("ta_bench_ooc_")
    import os

    os.environ["TUNE_AGE_CACHE"] = str(work / "cache")  # an empty decode cache: (a) decodes
    (work / "space.yaml").write_text(SPACE.format(size=args.image_size))
    t0 = time.perf_counter()
    from tune_age.data.synthetic import ensure_synthetic

    ensure_synthetic(n=args.synthetic_n, seed=0, cache_root=work / "cache")
    data_bytes = args.synthetic_n * 3 * args.image_size ** 2
    store = max(75 << 20, int(data_bytes / 2.5))
    print(f"data set: {args.synthetic_n:,} faces at {args.image_size} px = {common.mib(data_bytes)} (uint8), "
          f"drawn in {time.perf_counter() - t0:.0f} s; (a)'s object store {common.mib(store)} = "
          f"data / {data_bytes / store:.1f}; {common.CORES} cores, load average {common.load_average()}",
          flush=True)

    sides = {}
    for key, name, store_bytes, mode in (("a", "out-of-core", store, "auto"), ("b", "in-memory", None, "off")):
        sides[key] = one_search(args, name, work, store_bytes, mode)
        r = sides[key]
        print(f"({key}) {name}: {r['seconds']:.0f} s, object store {common.mib(r['store'])}, "
              f"decoded {r['decoded']:,} images, trials {[t['status'] for t in r['trials']]}", flush=True)

    common.section("where the trials' images came from")
    for key, r in sides.items():
        print(f"({key}) " + "; ".join(sorted({t['from'] for t in r['trials']})))

    common.section("peak memory of the process tree, by role, at the PSS peak")
    print("held = PSS less mapped files: anonymous and shared memory (the object store), which "
          "the kernel cannot drop; file = PSS of mapped files (libraries, and the mapped decode "
          "cache, page cache it may drop and read again)")
    for key, r in sides.items():
        print(f"-- ({key}): peak PSS {common.mib(r['peak']['Pss'])}, peak held {common.mib(r['peak']['Held'])}")
        print(f"   {'role':>22}     {'PSS':>9} {'held':>9} {'file':>9} {'shm PSS':>9}")
        for role, m in sorted(r["at_peak"].items(), key=lambda kv: -kv[1]["Pss"]):
            print(f"   {role:>22} x{m['n']:<2} " + " ".join(f"{common.mib(v):>9}" for v in (
                m["Pss"], m["Pss"] - m["FilePss"], m["FilePss"], m["ShmPss"])))

    common.section("epoch speed (training images per second per trial, every epoch)")
    speed = {}
    for key, r in sides.items():
        values = [v for t in r["trials"] for v in t["speeds"]]
        speed[key] = statistics.median(values) if values else 0.0
        print(f"({key}) median {speed[key]:.0f} img/s of {len(values)} epochs: {common.spread(values, '{:.0f}')}")
    ratio = speed["a"] / speed["b"] if speed["b"] else 0.0

    a, b = sides["a"], sides["b"]
    finished = all(t["status"] == "completed" and t["epochs"] == args.epochs for r in sides.values() for t in r["trials"])
    mapped = all(t["from"].startswith("memory-mapped") for t in a["trials"])
    once = a["decoded"] == args.synthetic_n and b["decoded"] == 0
    held = a["peak"]["Held"] < data_bytes
    fast = ratio >= SPEED_TARGET
    print(f"RESULT out_of_core: data {common.mib(data_bytes)} = {data_bytes / a['store']:.1f} x (a)'s object "
          f"store; finished: {common.verdict(finished)}; (a) mapped the decode cache: {common.verdict(mapped)}; "
          f"decoded once ({a['decoded']:,} then {b['decoded']:,}): {common.verdict(once)}; (a) peak held "
          f"{common.mib(a['peak']['Held'])} (PSS {common.mib(a['peak']['Pss'])}) < data: {common.verdict(held)} "
          f"[(b) held {common.mib(b['peak']['Held'])}]; epochs {speed['a']:.0f} vs {speed['b']:.0f} img/s = "
          f"{ratio:.2f} x (target >= {SPEED_TARGET}): {common.verdict(fast)}")
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)  # the drawn faces and their decode cache: GiBs
    else:
        print(f"kept: {work}")
    return 0 if finished and mapped and once else 1


if __name__ == "__main__":
    sys.exit(main())
