"""Training throughput: the engine's images/sec against a minimal hand-written PyTorch loop.

Same model (TrainConfig's defaults: 3 conv blocks 32-64-128, 64 px, batch 64, AdamW,
random flips), same batch and same data (the built-in synthetic faces' train split),
the same number of threads a trial gets. The machine is shared, so the three loops take turns
on short chunks of the epoch (4 batches each, the order rotating), which puts any load from
other processes on all of them alike; a round is one pass over the train split by each loop,
and each figure is the median over rounds with its range:

  engine        tune_age.training.start_run (the model and the train images as a trial
                holds them) and engine.train_one_epoch
  plain         the hand-written loop of benchmarks/common.py on the same model, in the
                same memory format as the engine's
  plain NCHW    the same loop on a freshly built model in PyTorch's default layout

Then the achieved FLOP/s of the engine (a training step's forward and backward FLOPs, counted
with torch.utils.flop_counter) as a share of two limits at the same thread count: the best
fp32 torch.mm FLOP/s over several GEMM shapes, square and the tall-skinny ones convolutions
become (timed between the rounds), and the CPU's theoretical peak from its SIMD width and
clock, where /proc/cpuinfo tells them.

    python benchmarks/throughput.py            # 5 rounds, 1 thread (what a trial gets here)
    python benchmarks/throughput.py --quick    # 2 rounds of 10 batches
    python benchmarks/throughput.py --threads 2 --rounds 3
"""

from __future__ import annotations

import argparse
from pathlib import Path
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import common
from tune_age.training import engine
from tune_age.config import DataConfig, TrainConfig
from tune_age.data import load_data
from tune_age.models import build_model
from tune_age.training import start_run

TARGET = 0.95


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="epochs of each loop, interleaved (default 5)")
    p.add_argument("--batches", type=int, default=None,
                   help="batches per timed epoch (default: the whole train split, 2098 images)")
    p.add_argument("--chunk", type=int, default=4, help="batches per turn of each loop (default 4)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: what a trial gets on this machine)")
    p.add_argument("--synthetic-n", type=int, default=3000, help="built-in faces (default 3000)")
    p.add_argument("--quick", action="store_true", help="2 rounds of 10 batches")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.batches = 2, 10
    return args


def trial_threads() -> int:
    from tune_age.search import local_resources, plan_resources
    from tune_age.config import SearchConfig

    cpus, _ = plan_resources(SearchConfig(), local_resources())
    return max(1, int(cpus))


GEMM_SHAPES = (  # (m, k, n): square ones and the tall-skinny ones convolutions lower to
    (512, 512, 512), (1024, 1024, 1024), (2048, 2048, 2048), (4096, 1024, 1024),
    (16384, 288, 64), (4096, 576, 128), (65536, 27, 32),
)


def gemm_flops(m: int, k: int, n: int, reps: int = 5) -> float:
    """fp32 FLOP/s of one (m x k) @ (k x n) torch.mm, the median of `reps` timed runs."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    torch.mm(a, b)
    times = []
    for _ in range(max(reps, 1)):
        t = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t)
    return 2 * m * k * n / statistics.median(times)


def gemm_limit(shapes=GEMM_SHAPES, reps: int = 5) -> tuple[float, tuple[int, int, int]]:
    """The best fp32 FLOP/s over several GEMM shapes, and the shape that reached it."""
    return max((gemm_flops(*s, reps=reps), s) for s in shapes)


def fma_peak(threads: int) -> tuple[float | None, str]:
    """The CPU's fp32 peak from its SIMD width and clock: lanes x 2 (an FMA is two FLOPs) x
    2 FMA units per core (true of current x86 server cores, assumed) x GHz x threads; None
    where the flags or the clock cannot be read. The clock is the highest the kernel reports
    (cpufreq's cpuinfo_max_freq, else /proc/cpuinfo's "cpu MHz", which may be the base clock
    of a virtual machine, so that measured GEMMs can beat it)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None, "no /proc/cpuinfo"
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags and "fma" in flags else 4 if "sse2" in flags else 0
    ghz, source = None, ""
    freq = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    if freq.is_file():
        ghz, source = int(freq.read_text()) / 1e6, "cpufreq max"
    else:
        mhz = [float(line.split(":", 1)[1]) for line in info.splitlines() if line.startswith("cpu MHz")]
        if mhz:
            ghz, source = max(mhz) / 1e3, "/proc/cpuinfo cpu MHz"
    if not lanes or not ghz:
        return None, "SIMD width or clock unknown"
    isa = {16: "AVX-512", 8: "AVX2+FMA", 4: "SSE"}[lanes]
    return lanes * 2 * 2 * ghz * 1e9 * threads, f"{isa}, {lanes} fp32 lanes x 2 x 2 FMA units x {ghz:.2f} GHz ({source}) x {threads} thread(s)"


def forward_flops(model: torch.nn.Module, size: int) -> float:
    """Forward FLOPs per image (a multiply-add counts 2)."""
    model.eval()
    x = torch.randn(8, 3, size, size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    model.train()
    return counter.get_total_flops() / 8


def training_flops(model: torch.nn.Module, size: int, classes: int) -> float:
    """FLOPs per image of one training step, forward and backward as autograd runs them
    (counted, not estimated as 3x forward: the first layer computes no input gradient)."""
    x = torch.randn(8, 3, size, size)
    y = torch.arange(8) % classes
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 8


def main(argv=None) -> int:
    args = parse(argv)
    threads = args.threads or trial_threads()
    torch.set_num_threads(threads)
    cfg = TrainConfig()
    data = load_data(DataConfig(synthetic_n=args.synthetic_n), [cfg.image_size], progress=False)
    size = cfg.image_size
    x, y = common.split(data, size, "train")
    if args.batches:
        keep = min(len(y), args.batches * cfg.batch_size)
        x, y = x[:keep], y[:keep]
    mean, std = common.norm_tensors(data)
    n = len(y)

    run = start_run(cfg, data, torch.device("cpu"))
    engine_x = run.tensors["train_x"]  # on the CPU a view of the shared array (SplitView)

    def engine_rows(a: int, b: int):
        if isinstance(engine_x, torch.Tensor):
            return engine_x[a:b]
        return type(engine_x)(engine_x.images, engine_x.rows[a:b])
    layout = (torch.channels_last if run.model.features[0].weight.is_contiguous(memory_format=torch.channels_last)
              else torch.contiguous_format)

    def fresh(fmt):
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, len(data.groups), size).to(memory_format=fmt)
        opt = engine.build_optimizer(cfg, model)
        return model, opt

    plain_model, plain_opt = fresh(layout)
    nchw_model, nchw_opt = fresh(torch.contiguous_format)
    gen = torch.Generator().manual_seed(0)

    loops = {  # each takes the rows a:b of the train split
        "engine": lambda a, b: engine.train_one_epoch(
            run.model, engine_rows(a, b), run.tensors["train_y"][a:b], run.optimizer, run.loss_fn,
            batch_size=cfg.batch_size, norm=run.norm, augment=run.augment, generator=run.generator),
        "plain": lambda a, b: common.plain_train_epoch(plain_model, x[a:b], y[a:b], plain_opt, mean,
                                                       std, cfg.batch_size, gen),
        "plain NCHW": lambda a, b: common.plain_train_epoch(nchw_model, x[a:b], y[a:b], nchw_opt, mean,
                                                            std, cfg.batch_size, gen),
    }
    chunk = args.chunk * cfg.batch_size
    print(f"threads {threads}; {n} images of {size} px per epoch, batch {cfg.batch_size}; "
          f"engine model layout: {'channels_last' if layout is torch.channels_last else 'NCHW'}; "
          f"load average {common.load_average()}", flush=True)
    for loop in loops.values():
        loop(0, 2 * cfg.batch_size)  # first calls pick oneDNN kernels and allocate

    rates: dict[str, list[float]] = {name: [] for name in loops}
    peaks: list[float] = []
    names = list(loops)
    with common.Sampler() as load:
        for r in range(args.rounds):
            peaks.append(gemm_limit()[0])
            seconds = dict.fromkeys(names, 0.0)
            for c, start in enumerate(range(0, n, chunk)):
                k = (r + c) % len(names)
                for name in names[k:] + names[:k]:  # rotate who goes first
                    t = time.perf_counter()
                    loops[name](start, min(start + chunk, n))
                    seconds[name] += time.perf_counter() - t
            for name in names:
                rates[name].append(n / seconds[name])
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rates.items())
                  + " img/s", flush=True)
        peaks.append(gemm_limit()[0])

    probe = build_model(cfg, len(data.groups), size)
    flops_img = forward_flops(probe, size)
    train_img = training_flops(probe, size, len(data.groups))
    eng, plain, nchw = (statistics.median(rates[k]) for k in names)
    ratios = [e / p for e, p in zip(rates["engine"], rates["plain"])]
    achieved = train_img * eng
    peak = max(peaks)
    best_shape = gemm_limit(reps=3)[1]
    theory, how = fma_peak(threads)

    common.section("throughput (median over rounds, range in brackets)")
    print(f"noise: other processes used {load.others_cores:.2f} of {common.CORES} cores on average; "
          f"per-round engine/plain ratio {common.spread(ratios, '{:.3f}')}")
    for k in names:
        print(f"{k:>12}: {common.spread(rates[k])} img/s")
    print(f"model: {flops_img / 1e6:.1f} MFLOP forward per image, {train_img / 1e6:.1f} MFLOP per "
          f"training image (forward + backward, counted; {train_img / flops_img:.2f}x forward)")
    print(f"measured limit ({threads} thread(s)): best fp32 GEMM over {len(GEMM_SHAPES)} shapes "
          f"{common.spread([p / 1e9 for p in peaks])} GFLOP/s (best shape m,k,n = {best_shape})")
    if theory:
        print(f"theoretical peak: {theory / 1e9:.1f} GFLOP/s ({how})"
              + ("; the measured GEMM beats it, so the clock read is below the real one" if peak > theory else ""))
    else:
        print(f"theoretical peak: unknown ({how})")
    share_theory = f", {achieved / theory:.0%} of the theoretical peak" if theory else ""
    print(f"engine achieved {achieved / 1e9:.1f} GFLOP/s = {achieved / peak:.0%} of the measured GEMM limit"
          f"{share_theory} (plain NCHW loop: {train_img * nchw / peak:.0%})")
    print(f"engine / plain NCHW = {eng / nchw:.3f} (what the memory format buys)")
    print(f"RESULT throughput: engine {eng:.0f} img/s, plain loop {plain:.0f} img/s, "
          f"engine/plain = {eng / plain:.3f}  (target >= {TARGET}: {common.verdict(eng / plain >= TARGET)}); "
          f"{achieved / peak:.0%} of the measured GEMM limit{share_theory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
