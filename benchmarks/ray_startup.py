"""Ray's own fixed costs per search, apart from tune_age: its start, a first actor, its shutdown,
and whether an actor (a Tune trial is one) can start in a worker Ray started ahead of time.

Each repeat runs in a fresh process, as a search does: `start_ray` (tune_age's settings),
one actor like a Tune trial's (its runtime_env) asked for and answering, the CPU Ray's own
processes take over 20 s with nothing running (what trials share with them), `ray.shutdown()`.
Then, with Ray's prestarted workers turned back on (and no job runtime_env), an actor asked
for once the idle workers are up, with the runtime_env Tune gives every trial actor and with
none: did Ray give it one of them (the process is older than the request) or start a new
one? Only an idle worker Ray hands to a trial could have imported torch while the driver
loads the data.

    python benchmarks/ray_startup.py               # 5 repeats (about 3.5 min)
    python benchmarks/ray_startup.py --repeats 9
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import common

# The child: times in seconds, one JSON line.
CHILD = r"""
import json, os, sys, time
t0 = time.time()
import ray
from ray.tune.execution.class_cache import DEFAULT_ENV_VARS
from tune_age.search import start_ray
prestart = sys.argv[1] == "prestart"
IDLE_S = 20
t_import = time.time()
if prestart:
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    time.sleep(8)  # the prestarted workers are up and idle
else:
    start_ray(None)
t_up = time.time()

def started(pid):
    with open(f"/proc/{pid}/stat") as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK"))

class Probe:
    def pid(self):
        return os.getpid()

out = {"import": t_import - t0, "ray.init": t_up - t_import, "actors": {}}
for name, env in (("Tune's runtime_env", {"env_vars": dict(DEFAULT_ENV_VARS)}), ("no runtime_env", None)):
    cls = ray.remote(runtime_env=env)(Probe) if env else ray.remote(Probe)
    asked = time.time()
    pid = ray.get(cls.options(num_cpus=1).remote().pid.remote())
    out["actors"][name] = {"answered_s": time.time() - asked, "prestarted": started(pid) < asked - 0.5}
if not prestart:  # what Ray's own processes take while nothing runs (trials share it)
    sys.path.insert(0, os.path.dirname(sys.argv[2]))
    import common
    def ticks():
        return {p: common._cpu_ticks(str(p)) for p in common.process_tree() if p != os.getpid()}
    time.sleep(2)  # the probe actors' workers exit
    before, t_idle = ticks(), time.time()
    time.sleep(IDLE_S)
    used = sum(t - before.get(p, 0) for p, t in ticks().items())  # per process: exits do not subtract
    out["idle_cores"] = used / common.TICK / (time.time() - t_idle)
t_down = time.time()
ray.shutdown()
out["ray.shutdown"] = time.time() - t_down
print(json.dumps(out))
"""


def child(mode: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, common.__file__], capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0:
        sys.exit(f"ray_startup: the {mode} child failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="fresh processes per mode (default 5)")
    args = p.parse_args(argv)
    print(f"{common.CORES} cores; load average {common.load_average()}", flush=True)
    runs = [child("plain") for _ in range(args.repeats)]
    common.section(f"tune_age's start_ray, {args.repeats} fresh processes (s)")
    for key in ("import", "ray.init", "ray.shutdown"):
        print(f"{key:>34} {common.spread([r[key] for r in runs], '{:.2f}')}")
    first = [r["actors"]["Tune's runtime_env"]["answered_s"] for r in runs]
    print(f"{'first actor asked -> answered':>34} {common.spread(first, '{:.2f}')}")
    idle = [100 * r["idle_cores"] for r in runs]
    print(f"{'idle Ray, % of a core':>34} {common.spread(idle, '{:.1f}')}  (its processes, 20 s with nothing running)")

    warm = [child("prestart") for _ in range(min(args.repeats, 3))]
    common.section("Ray's prestarted workers on (its default), actors asked for once they are idle")
    for name in warm[0]["actors"]:
        used = sum(r["actors"][name]["prestarted"] for r in warm)
        print(f"{name:>34} got a prestarted worker in {used} of {len(warm)}")
    got = "; ".join(f"{name} {sum(r['actors'][name]['prestarted'] for r in warm)}/{len(warm)}"
                    for name in warm[0]["actors"])
    print(f"RESULT ray_startup: ray.init {common.spread([r['ray.init'] for r in runs], '{:.2f}')} s, "
          f"ray.shutdown {common.spread([r['ray.shutdown'] for r in runs], '{:.2f}')} s; "
          f"idle Ray {common.spread(idle, '{:.1f}')} % of a core; "
          f"an actor got a prestarted worker: {got}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
