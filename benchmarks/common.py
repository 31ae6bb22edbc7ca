"""What the benchmarks share: a plain PyTorch training loop, CPU and memory sampling of the
process tree, and figures printed with their spread.

Not part of the package: the scripts beside this file import it as `common` (Python puts
the script's own folder first on sys.path).
"""

from __future__ import annotations

import json
import os
import select
import statistics
import subprocess
import sys
import time
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")
TICK = os.sysconf("SC_CLK_TCK")
CORES = len(os.sched_getaffinity(0))


# --- figures ---------------------------------------------------------------------------------


def spread(values: list[float], fmt: str = "{:.1f}") -> str:
    """'median (min-max, n=K)', so every figure says how much it moved between repeats."""
    if not values:
        return "n/a"
    med = statistics.median(values)
    if len(values) == 1:
        return f"{fmt.format(med)} (n=1)"
    return f"{fmt.format(med)} ({fmt.format(min(values))}-{fmt.format(max(values))}, n={len(values)})"


def verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def section(title: str) -> None:
    print(f"\n== {title} ==", flush=True)


# --- the plain loop -----------------------------------------------------------------------


def plain_train_epoch(model, images, labels, optimizer, mean, std, batch_size, gen, flip=True):
    """A hand-written epoch: index a batch of uint8 images, normalize, flip half, step.

    The work the engine does for TrainConfig's defaults, without its metrics or checks.
    """
    import torch
    import torch.nn.functional as F

    model.train()
    n = len(labels)
    order = torch.randperm(n, generator=gen)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        if len(idx) < 2:
            break
        x = (images[idx].float() / 255.0 - mean) / std
        if flip:
            x = torch.where((torch.rand(len(idx), generator=gen) < 0.5).view(-1, 1, 1, 1), x.flip(3), x)
        loss = F.cross_entropy(model(x), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return loss.item()


def plain_evaluate(model, images, labels, mean, std, batch_size=256) -> float:
    import torch

    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(labels), batch_size):
            x = (images[start:start + batch_size].float() / 255.0 - mean) / std
            correct += int((model(x).argmax(1) == labels[start:start + batch_size]).sum())
    return correct / max(len(labels), 1)


def norm_tensors(data):
    import torch

    mean = torch.tensor(data.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(data.std, dtype=torch.float32).view(1, 3, 1, 1)
    return mean, std


def split(data, size: int, name: str):
    import torch

    rows = data.splits[name]
    return torch.from_numpy(data.images[size][rows]), torch.from_numpy(data.labels[rows])


# --- timestamps from inside Ray trials -------------------------------------------------------


def timed_trainable(timing_dir, load=None):
    """tune_age.search.trainable.train_trial with the wall-clock times of its phases written to
    `timing_dir/<trial id>.json`: entered, each epoch's (start, end), each tune.report's
    (start, end), ended, and the process's memory (memory_of) on entry and when the first
    epoch starts. With `load`, the trial ignores the data Ray hands it and calls
    `load()` for its own (timed as "loaded").

        tune_age.search.trainable.train_trial = timed_trainable(folder)   # before run_search
        ray.cloudpickle.register_pickle_by_value(common)           # workers need not import us
    """

    def trainable(config, data, max_epochs, **options):  # options: train_trial's keywords
        from ray import tune

        import tune_age.search.trainable as T

        # Looked up here, in the worker, where the module is unpatched: a reference taken in
        # the driver would be pickled by value, with its own copy of the module's globals.
        real = getattr(T, "_untimed_train_trial", T.train_trial)
        marks = {"entered": time.time(), "epochs": [], "reports": [], "process_start": process_start(),
                 "memory_entered": memory_of(os.getpid())}
        if load is not None:
            data = load()
            marks["loaded"] = time.time()
        real_epoch, real_report = T.run_epoch, tune.report

        def run_epoch(run):
            if not marks["epochs"]:  # the trial's setup is done: what did it add?
                marks["memory_setup"] = memory_of(os.getpid())
            t = time.time()
            out = real_epoch(run)
            marks["epochs"].append((t, time.time()))
            return out

        def report(*args, **kwargs):
            t = time.time()
            real_report(*args, **kwargs)
            marks["reports"].append((t, time.time()))

        T.run_epoch, tune.report = run_epoch, report
        try:
            real(config, data, max_epochs, **options)
        except BaseException as exc:
            marks["error"] = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            T.run_epoch, tune.report = real_epoch, real_report
            marks["ended"] = time.time()
            marks["pid"] = os.getpid()
            Path(timing_dir, f"{tune.get_context().get_trial_id()}.json").write_text(json.dumps(marks))

    return trainable


def process_start(pid: int | str = "self") -> float:
    """When a process started, in time.time() seconds (its start in ticks after boot, from /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / TICK)


def read_timings(timing_dir) -> list[dict]:
    """The timed trials' marks; a benchmark whose trials failed stops here, saying why."""
    trials = [json.loads(p.read_text()) for p in sorted(Path(timing_dir).glob("*.json"))]
    failed = [t["error"] for t in trials if "error" in t]
    if failed or not trials:
        sys.exit(f"benchmark: {len(failed)} of {len(trials)} timed trial(s) failed"
                 + (f"; the first: {failed[0]}" if failed else ""))
    return trials


def slot_gaps(trials: list[dict]) -> float:
    """Seconds between one trial's end and the next one's start in the same process, summed."""
    by_pid: dict[int, list[dict]] = {}
    for t in trials:
        by_pid.setdefault(t["pid"], []).append(t)
    gaps = 0.0
    for ts in by_pid.values():
        ts.sort(key=lambda t: t["entered"])
        gaps += sum(b["entered"] - a["ended"] for a, b in zip(ts, ts[1:]))
    return gaps


# --- the process tree and the rest of the machine -------------------------------------------


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def process_tree(root: int | None = None) -> list[int]:
    """`root` (this process by default) and all its descendants: Ray's raylet, GCS and workers too."""
    root = root or os.getpid()
    kids, out, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def _cpu_ticks(pid: str) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return 0


def _name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        return cmd or open(f"/proc/{pid}/comm").read().strip()
    except OSError:
        return "?"


def memory_of(pid: int) -> dict[str, int] | None:
    """Bytes: Rss, Pss (each shared page split among its sharers), Private, the shared
    memory part of Rss and Pss (ShmRss, ShmPss: on a Ray node, almost all of it the object
    store), Anon (anonymous memory: the heap, numpy and torch arrays; neither shared
    memory nor mapped files such as torch's libraries) and FilePss (the Pss of mapped files:
    libraries, and a memory-mapped data file, whose clean pages the kernel may drop and read
    again; Pss - FilePss is what it cannot, without swap)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            rollup = f.read()
        with open(f"/proc/{pid}/status") as f:
            status = f.read()
    except OSError:
        return None
    kb = {}
    for line in (rollup + status).splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            kb[key] = int(parts[0]) * 1024
    return {"Rss": kb.get("Rss", 0), "Pss": kb.get("Pss", 0),
            "Private": kb.get("Private_Clean", 0) + kb.get("Private_Dirty", 0),
            "ShmRss": kb.get("RssShmem", 0), "ShmPss": kb.get("Pss_Shmem", 0),
            "Anon": kb.get("Anonymous", 0), "FilePss": kb.get("Pss_File", 0)}


class Sampler:
    """Samples, every `interval` seconds, the CPU used by this process tree and by everything
    else on the machine, and (with memory=True) the tree's summed Rss and Pss.

        with Sampler(memory=True, roles=ROLES) as s:
            run_search(...)
        s.others_cores, s.peak["Pss"], s.at_peak   # cores others took; peak bytes; by role
        s.cpu_by_role                              # CPU seconds of the tree, by role

    It runs in a child process (`python common.py --root PID`), so it neither takes the
    GIL from the loop being timed nor counts itself: a thread here slowed the engine's
    Python-heavier loop more than the plain one and skewed their ratio by 10-15 %.
    `roles` maps substrings of a command line to a role name (first match; else "other");
    with roles, the tree's CPU time is also summed by role (the sampler's interval apart, a
    process that lives shorter than one interval is missed).
    """

    def __init__(self, interval: float = 0.5, memory: bool = False, roles: dict | None = None):
        self.args = [sys.executable, __file__, "--root", str(os.getpid()), "--interval", str(interval),
                     "--roles", json.dumps(roles or {})] + (["--memory"] if memory else [])
        self.result: dict = {}

    def __enter__(self) -> "Sampler":
        self.proc = subprocess.Popen(self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc) -> None:
        out, _ = self.proc.communicate("stop\n", timeout=60)
        self.result = json.loads(out)

    def __getattr__(self, name: str):
        if name in ("proc", "args", "result"):
            raise AttributeError(name)
        return self.result[name]


def _role(cmd: str, roles: dict) -> str:
    words = cmd.split()
    script = next((w for w in words[1:] if not w.startswith("-")), "")
    head = f"{words[0] if words else ''} {script}"  # the program and its script; options mislead
    return next((role for key, role in roles.items() if key in head), "other")


def _sample(root: int, interval: float, memory: bool, roles: dict) -> dict:
    """The sampler process: loops until a line (or EOF) arrives on stdin."""
    me = os.getpid()
    ticks: dict[str, int] = {}
    ours = others = 0
    t0 = time.monotonic()
    first = True
    res = {"peak": {"Pss": 0, "Rss": 0}, "at_peak": {}, "samples": 0, "series": []}
    by_role: dict[str, int] = {}
    while True:
        tree = {str(p) for p in process_tree(root) if p != me}
        now = {e.name: _cpu_ticks(e.name) for e in os.scandir("/proc") if e.name.isdigit()}
        if not first:
            for pid, t in now.items():
                if pid == str(me):
                    continue
                delta = t - ticks.get(pid, 0)  # a process born since the last sample counts whole
                if pid in tree:
                    ours += delta
                    if roles and delta:
                        role = _role(_name(int(pid)), roles)  # titles change: ray::IDLE -> a trial
                        by_role[role] = by_role.get(role, 0) + delta
                else:
                    others += delta
        first = False
        ticks = now
        if memory:
            _sample_memory(sorted(map(int, tree)), roles, res, time.monotonic() - t0)
        ready, _, _ = select.select([sys.stdin], [], [], interval)
        if ready:
            break
    elapsed = max(time.monotonic() - t0, 1e-9)
    res.update(ours_cores=ours / TICK / elapsed, others_cores=others / TICK / elapsed, seconds=elapsed,
               cpu_by_role={role: t / TICK for role, t in by_role.items()})
    return res


def _sample_memory(pids: list[int], roles: dict, res: dict, t: float) -> None:
    total = {"Pss": 0, "Rss": 0, "Held": 0}
    by_role: dict[str, dict[str, int]] = {}
    for pid in pids:
        mem = memory_of(pid)
        if not mem:
            continue
        r = by_role.setdefault(_role(_name(pid), roles), dict.fromkeys(["n", *mem], 0))
        r["n"] += 1
        for key, value in mem.items():
            r[key] += value
        total["Pss"] += mem["Pss"]
        total["Rss"] += mem["Rss"]
        total["Held"] += mem["Pss"] - mem["FilePss"]
    res["samples"] += 1
    res["series"].append((round(t, 1), total["Pss"], total["Rss"]))
    res["peak"]["Rss"] = max(res["peak"]["Rss"], total["Rss"])
    res["peak"]["Held"] = max(res["peak"].get("Held", 0), total["Held"])  # Pss less mapped files
    if total["Pss"] >= res["peak"]["Pss"]:
        res["peak"]["Pss"] = total["Pss"]
        res["at_peak"] = by_role


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def load_average() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def fresh_dir(prefix: str) -> Path:
    import tempfile

    return Path(tempfile.mkdtemp(prefix=prefix))


if __name__ == "__main__":  # the Sampler's child process
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--root", type=int, required=True)
    p.add_argument("--interval", type=float, default=0.5)
    p.add_argument("--memory", action="store_true")
    p.add_argument("--roles", default="{}")
    a = p.parse_args()
    print(json.dumps(_sample(a.root, a.interval, a.memory, json.loads(a.roles))))
