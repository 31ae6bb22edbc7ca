"""Trials packed on one GPU: aggregate images/s and GPU memory per trial for 1, 2, 4 and 8
concurrent trials of a `quick` model and a `transfer` model.

    python benchmarks/gpu_packing.py                # on a machine with CUDA: under 5 minutes
    python benchmarks/gpu_packing.py --device cpu --levels 1,2 --seconds 4   # a smoke run, no GPU

Each trial is its own process on the same device, as Ray runs trials at a fractional
`--gpus-per-trial` (1/k for k trials): it builds the run with tune_age's own
training.start_run, which moves the data set to the GPU once, trains one warm-up epoch,
waits for the others, then trains for `--seconds` and reports the training images it
processed per second and the most GPU memory it held (torch.cuda.max_memory_allocated and
reserved). The table prints per model and k: images/s of each trial, their sum, the sum
against one trial's, and memory per trial. Target: 4 `quick` trials on one GPU give at
least 3x the images/s of one (RESULT line).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from common import section, verdict

MODELS = {
    # the quick space's middle: a 3-block CNN on 48 px faces
    "quick": {"arch": "cnn", "conv_layers": 3, "channels": 32, "batch_norm": True, "head": "gap",
              "fc_layers": 1, "fc_width": 64, "image_size": 48, "batch_size": 64, "optimizer": "adamw",
              "lr": 3e-3, "schedule": "cosine", "flip": True},
    # the transfer space fine-tuning resnet18 at 96 px (random weights: the same work as pretrained ones)
    "transfer": {"arch": "resnet18", "pretrained": False, "freeze": "none", "image_size": 96,
                 "batch_size": 64, "optimizer": "adamw", "lr": 1e-3, "schedule": "cosine", "flip": True},
}
TARGET = 3.0  # 4 quick trials / 1


def worker(model: str, seconds: float, start_at: float, device: str, n: int) -> None:
    import torch

    from tune_age.config import DataConfig, TrainConfig
    from tune_age.data import load_data
    from tune_age.training import run_epoch, start_run

    cfg = TrainConfig.from_dict({**MODELS[model], "epochs": 1000, "device": device, "amp": True})
    data = load_data(DataConfig(synthetic_n=n), [cfg.image_size], progress=False)
    run = start_run(cfg, data)  # the data set moves to the device here, once
    run_epoch(run)  # warm-up: kernels chosen, memory pools grown
    while time.time() < start_at:
        time.sleep(0.05)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    images, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        out = run_epoch(run)
        images += round(out["images_per_sec"] * out["epoch_seconds"])
    elapsed = time.perf_counter() - began
    memory = ({"allocated_mib": torch.cuda.max_memory_allocated() / 2**20,
               "reserved_mib": torch.cuda.max_memory_reserved() / 2**20} if device == "cuda" else {})
    print("RESULT_JSON " + json.dumps({"images_per_sec": images / elapsed, "epochs": run.epoch - 1, **memory}),
          flush=True)


def level(model: str, k: int, args) -> list[dict]:
    """k concurrent trials of `model`; each trial's figures."""
    start_at = time.time() + args.startup
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", model, "--seconds", str(args.seconds),
                               "--start-at", str(start_at), "--device", args.device, "--n", str(args.n)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(k)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=args.startup + args.seconds + 120)
        line = next((ln for ln in out.splitlines() if ln.startswith("RESULT_JSON ")), None)
        if p.returncode or line is None:
            sys.exit(f"a {model} trial of {k} failed (exit {p.returncode}): {err.strip().splitlines()[-1:]}")
        results.append(json.loads(line.removeprefix("RESULT_JSON ")))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", choices=MODELS, help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=12.0, help="measured training time per level")
    parser.add_argument("--startup", type=float, default=25.0,
                        help="seconds every trial gets to load, move its data and warm up before the window")
    parser.add_argument("--levels", default="1,2,4,8", help="trials at once")
    parser.add_argument("--models", default="quick,transfer")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--n", type=int, default=3000, help="synthetic faces")
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.seconds, args.start_at, args.device, args.n)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_packing.py: no CUDA device visible to torch; run it on a GPU machine "
                 "(or --device cpu for a smoke run, whose figures say nothing about GPUs)")
    where = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    levels = [int(k) for k in args.levels.split(",")]
    # Draw and decode the faces once, so the trials only read the cache.
    from tune_age.config import DataConfig
    from tune_age.data import load_data

    load_data(DataConfig(synthetic_n=args.n), sorted({MODELS[m]["image_size"] for m in args.models.split(",")}),
              progress=False)
    section(f"trials packed on one device: {where}, torch {torch.__version__}, {args.seconds:g} s measured per level")
    print(f"{'model':<9} {'trials':>6} {'img/s per trial':>16} {'img/s total':>12} {'x one':>6} "
          f"{'GPU MiB per trial (allocated / reserved)':>42}")
    one: dict[str, float] = {}
    ratios: dict[tuple[str, int], float] = {}
    began = time.time()
    for model in args.models.split(","):
        for k in levels:
            results = level(model, k, args)
            total = sum(r["images_per_sec"] for r in results)
            one.setdefault(model, total / k if k == 1 else total)
            ratios[model, k] = total / one[model]
            each = ", ".join(f"{r['images_per_sec']:.0f}" for r in results)
            mem = (f"{max(r['allocated_mib'] for r in results):.0f} / {max(r['reserved_mib'] for r in results):.0f}"
                   if "allocated_mib" in results[0] else "-")
            print(f"{model:<9} {k:>6} {each[:16]:>16} {total:>12.0f} {ratios[model, k]:>6.2f} {mem:>42}", flush=True)
    print(f"\n({time.time() - began:.0f} s)")
    if ("quick", 4) in ratios and ("quick", 1) in ratios:
        r = ratios["quick", 4]
        print(f"RESULT 4 quick trials on one {args.device.upper()} give {r:.2f}x the images/s of one "
              f"(target >= {TARGET:g}x): {verdict(r >= TARGET)}")


if __name__ == "__main__":
    main()
