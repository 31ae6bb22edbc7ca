"""Building and running a search: data once, Optuna TPE + ASHA, Ray Tune, resume.

    summary = run_search(SearchConfig(space="quick"), DataConfig())

The experiment folder `<storage>/<name>` holds Ray's trial folders and
checkpoints plus tune_age's own files: `tune_age.json` (what was asked for and
on which data), `trials.jsonl` (see tracking.py), `study.db` (the Optuna
study, readable with `optuna.load_study`) and `split.csv`.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ray.tune.schedulers import ASHAScheduler

from .. import __version__
from ..config import DataConfig, SearchConfig, TrainConfig
from ..data import FaceData, find_source, load_data
from ..data.mapped import file_server, hand_over, store_capacity
from ..errors import ConfigError, TuneAgeError
from ..models import min_image_size
from ..models.weights import pretrained_state, weights_digest
from ..training.crossval import DEFAULT_FOLDS, MIN_VAL_IMAGES
from ..training.selection import SCORE_KEY
from .lock import LOCK_FILE, DriverLock
from .searcher import BASELINE_KEY
from .spaces import Space, load_space, parse_space, seed_baseline
from .storage import OWN_FILES, DeferredDeletes, Mirror, Remote, aws_env, is_remote
from .study import STUDY_FILE, check_storage, study_url  # noqa: F401  (STUDY_FILE: results imports it from here)
from .tracking import FINAL, RELOCATED, TRIALS_FILE, TrialLog, read_trials, relocated, write_json_atomic

log = logging.getLogger(__name__)

META_FILE = "tune_age.json"
SPLIT_FILE = "split.csv"
DEFAULT_STORAGE = "~/tune_age_results"
# Save Ray's experiment state at least every 2 s, so that a killed driver loses
# at most that much bookkeeping (the default waits 10 s or more).
CHECKPOINT_PERIOD_S = "2"


@dataclass
class Plan:
    """Everything resolved before Ray starts trials."""

    exp_dir: Path
    name: str
    space: Space
    num_samples: int
    max_epochs: int
    grace_period: int
    reduction_factor: int
    baseline: TrainConfig | None


@functools.lru_cache(maxsize=None)
def remote_storage(uri: str) -> Remote:
    return Remote.parse(uri)


def experiment_dir(search: SearchConfig) -> tuple[Path, str]:
    """The experiment's folder and name; with object-store storage, the folder is the
    driver's working copy (storage.py)."""
    name = search.name or time.strftime("search-%Y%m%d-%H%M%S")
    if is_remote(search.storage):
        return remote_storage(search.storage).staging(name), name
    if search.storage and "://" in search.storage and not search.storage.startswith("file://"):
        raise ConfigError(f"--storage {search.storage}: give a path (local, or a file system every node "
                          "mounts) or an object store: s3://BUCKET/PREFIX or gs://BUCKET/PREFIX")
    if search.storage and search.storage.startswith("file://"):
        search = search.replace(storage=search.storage[len("file://"):])
    storage = Path(os.path.expanduser(search.storage or DEFAULT_STORAGE)).resolve()
    return storage / name, name


def _check_resumable(exp_dir: Path, name: str) -> None:
    if not (exp_dir / META_FILE).is_file():
        raise TuneAgeError(
            f"cannot resume {name!r}: {exp_dir} holds no tune_age search; "
            "check --name and --storage, or start a new search without --resume"
        )


def make_plan(search: SearchConfig) -> Plan:
    exp_dir, name = experiment_dir(search)
    if search.resume:
        _check_resumable(exp_dir, name)
        meta = json.loads((exp_dir / META_FILE).read_text())
        space = parse_space(meta["space"]["values"], meta["space"]["source"], meta["space"]["name"])
        baseline = TrainConfig.from_dict(meta["baseline"]) if meta.get("baseline") else None
        return Plan(exp_dir, name, space, meta["num_samples"], meta["max_epochs"],
                    meta["grace_period"], meta["reduction_factor"], baseline)
    if exp_dir.exists() and any(p.name != LOCK_FILE for p in exp_dir.iterdir()):
        raise TuneAgeError(
            f"experiment {name!r} already exists in {exp_dir.parent}; add --resume to continue it "
            "or choose another --name (tune_age never overwrites a search)"
        )
    space = load_space(search.space)
    settings = space.settings
    num_samples = search.num_samples or settings.get("num_samples", 10)
    max_epochs = search.max_epochs or settings.get("max_epochs", 10)
    use_baseline = search.baseline_first and bool(space.searched)
    return Plan(
        exp_dir, name, space, num_samples, max_epochs,
        min(settings.get("grace_period", 1), max_epochs), settings.get("reduction_factor", 3),
        seed_baseline() if use_baseline else None,
    )


def image_sizes(plan: Plan) -> list:
    sizes = list(plan.space.image_sizes())
    if plan.baseline is not None:
        sizes.append(plan.baseline.image_size)
    return sorted(set(sizes), key=str)


def check_plan(plan: Plan, data: FaceData) -> None:
    """Finds configurations that cannot be built before any trial starts."""
    plan.space.check_buildable(data.native_size)
    plan.space.check_combinations()
    for size in image_sizes(plan):
        data.resolve_size(size)  # "native" on images of mixed sizes fails here, clearly
    if plan.baseline is not None:
        size = data.resolve_size(plan.baseline.image_size)
        if size < min_image_size(plan.baseline):
            raise ConfigError(f"the seed baseline needs images of at least {min_image_size(plan.baseline)} px")


def pretrained_weights(plan: Plan, weights_dir: str | None) -> dict[str, dict]:
    """arch -> {"state": state dict, "id": its digest} for every pretrained body the space can
    ask for, found on disk here in the driver (a missing file fails before any trial)."""
    if True not in plan.space.values("pretrained"):
        return {}
    states = {arch: pretrained_state(arch, weights_dir) for arch in plan.space.values("arch") if arch != "cnn"}
    return {arch: {"state": state, "id": weights_digest(state)} for arch, state in states.items()}


def choose_folds(search: SearchConfig, data: FaceData) -> tuple[int, str]:
    """(folds per trial, why), from --cv or, left out, from the size of the validation split."""
    n_val = len(data.splits["val"])
    if search.cv is not None:
        return search.cv, "as --cv asks" if search.cv > 1 else "--cv 1: one train/val split"
    if n_val < MIN_VAL_IMAGES:
        return DEFAULT_FOLDS, (f"the validation split holds {n_val} images, fewer than {MIN_VAL_IMAGES}, "
                               "too few to choose by; --cv 1 turns it off")
    return 1, f"the validation split holds {n_val} images"


def local_resources() -> dict[str, float]:
    """What a local Ray instance will see: every CPU and CUDA GPU of this machine."""
    import torch

    return {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


def plan_resources(search: SearchConfig, cluster: dict[str, float]) -> tuple[float, float]:
    """(cpus, gpus) per trial: one GPU each where there are GPUs, else one or two CPUs."""
    total_cpu, total_gpu = float(cluster.get("CPU", 1)), float(cluster.get("GPU", 0))
    gpus = search.gpus_per_trial if search.gpus_per_trial is not None else (1.0 if total_gpu else 0.0)
    if gpus > total_gpu:
        raise ConfigError(
            f"--gpus-per-trial {gpus:g} asks for more GPUs than the {total_gpu:g} Ray sees; "
            f"use at most {total_gpu:g}" + (" (or leave it out to train on the CPU)" if not total_gpu else "")
        )
    if search.cpus_per_trial is not None:
        cpus = search.cpus_per_trial
    elif gpus:
        cpus = max(1.0, math.floor(total_cpu / max(1, math.floor(total_gpu / gpus))))
    else:
        cpus = 1.0 if total_cpu <= 4 else 2.0
    if cpus > total_cpu:
        raise ConfigError(f"--cpus-per-trial {cpus:g} is more than the {total_cpu:g} CPUs Ray sees")
    return cpus, gpus


class BaselineFullBudgetASHA(ASHAScheduler):
    """ASHA that never stops the seed baseline early, so it is compared at the full budget,
    and that decides after a restart as if there had been none.

    The baseline's results still count at every rung: it sets the bar others must pass.
    Ray restores the scheduler as it was built, with empty rungs (so after a restart the first
    trial to reach each rung would always go on); the first time this scheduler sees a trial
    in a driver, it fills its rungs from the trial log, which has every epoch's value.
    """

    def __init__(self, *args: Any, trial_log: str | Path | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._trial_log = str(trial_log) if trial_log else None
        self._remembered = False

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._remembered = False  # a new driver: the rungs are to be rebuilt

    def remember(self, trials: dict[str, dict]) -> int:
        """Records each logged trial's value at each rung milestone it reached, as ASHA would
        have; returns how many values it recorded."""
        count = 0
        for entry in trials.values():
            values = {int(epoch): value for epoch, value, _ in entry.get("scores", [])}
            for bracket in self._brackets:
                for milestone, recorded in bracket._rungs:
                    if milestone in values and entry["trial_id"] not in recorded:
                        recorded[entry["trial_id"]] = self._metric_op * values[milestone]
                        count += 1
        return count

    def _remember_once(self) -> None:
        if not self._remembered:
            self._remembered = True
            if self._trial_log:
                count = self.remember(read_trials(relocated(self._trial_log)))
                if count:
                    log.info("ASHA: %d rung values restored from the trial log", count)

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._remember_once()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        self._remember_once()
        decision = super().on_trial_result(tune_controller, trial, result)
        return self.CONTINUE if trial.config.get(BASELINE_KEY) else decision


def trial_slots(cpus: float, gpus: float, cluster: dict[str, float], limit: int | None) -> int:
    """How many trials fit at once on the cluster as it is now."""
    fit = math.floor(float(cluster.get("CPU", 1)) / cpus) if cpus else 1
    if gpus:
        fit = min(fit, math.floor(float(cluster.get("GPU", 0)) / gpus))
    return max(1, min(fit, limit) if limit else fit)


def trial_name(trial: Any) -> str:
    """Short trial folder names; Ray's default spells out the whole config."""
    return f"trial_{trial.trial_id}"


def start_ray(address: str | None, env: dict[str, str] | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    from ..training import TRIAL_PROCESS_ENV

    # Tune adds its own variables to these; `env`: the object store's, for workers on other nodes.
    runtime_env = {"env_vars": {**TRIAL_PROCESS_ENV, **(env or {})}}
    if address:
        ray.init(address=address, log_to_driver=False, runtime_env=runtime_env)
    else:
        # No prestarted workers: Ray would start one per CPU for plain tasks, but Tune's trial
        # actors carry a runtime_env and never use them, so they only cost CPU while the trials'
        # workers start (about 1 s each) and memory (about 50 MiB PSS each) for the whole search.
        ray.init(address="local", include_dashboard=False, log_to_driver=False,
                 runtime_env=runtime_env, _system_config={"prestart_worker_first_driver": False})


def _load_checked(plan: Plan, search: SearchConfig, data_cfg: DataConfig, source: tuple,
                  meta: dict | None, progress: bool) -> tuple[FaceData, int, str]:
    """The search's data (from find_source's `source`), checked against its plan (and a
    resumed search's own data), and its cross-validation folds with why."""
    data = load_data(data_cfg, image_sizes(plan), progress=progress, source=source)
    check_plan(plan, data)
    if meta is not None and not same_data(meta, data):
        raise TuneAgeError(
            f"the data of {plan.name!r} changed since the search started ({data.source}); "
            "resume needs the same files; start a new search for new data"
        )
    if meta is not None:
        return data, meta.get("cv", {}).get("folds", 1), "as the search began"
    return data, *choose_folds(search, data)


def in_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Callable[[], Any]:
    """Runs fn(*args, **kwargs) in a helper thread; returns the call, to be made once, that
    waits for its result (or raises what it raised). A daemon: Ctrl-C does not wait for it."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # raised again in the caller's thread
            out["error"] = exc

    thread = threading.Thread(target=run, name=f"tune_age-{fn.__name__}", daemon=True)
    thread.start()

    def result() -> Any:
        thread.join()
        if "error" in out:
            raise out.pop("error")
        return out.pop("value")  # held no longer here: the caller may drop it (the data set)

    return result


def write_meta(plan: Plan, search: SearchConfig, data_cfg: DataConfig, data: FaceData,
               cv: dict[str, Any], warm_start: dict | None = None) -> None:
    plan.exp_dir.mkdir(parents=True, exist_ok=True)
    import optuna
    import ray

    meta = {
        "name": plan.name,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "search": search.to_dict(),
        "data": data_cfg.to_dict(),
        "space": {
            "name": plan.space.name,
            "source": plan.space.source,
            "values": _space_values(plan.space),
        },
        "num_samples": plan.num_samples,
        "max_epochs": plan.max_epochs,
        "grace_period": plan.grace_period,
        "reduction_factor": plan.reduction_factor,
        "metric": search.metric,
        "mode": search.mode,
        "objectives": search.objective_list,
        "baseline": plan.baseline.to_dict() if plan.baseline else None,
        "groups": data.groups.to_dict(),
        "data_fingerprint": data.fingerprint,
        "data_content": data.content,
        "data_source": data.source,
        "native_size": data.native_size,
        "cv": cv,
        "warm_start": warm_start,  # where the study's first trials came from, when it did
        "split_sizes": {name: int(len(rows)) for name, rows in data.splits.items()},
        "unevaluated_groups": data.unevaluated,
        "versions": {"tune_age": __version__, "ray": ray.__version__, "optuna": optuna.__version__},
    }
    write_json_atomic(plan.exp_dir / META_FILE, meta)
    data.split_table().to_csv(plan.exp_dir / SPLIT_FILE, index=False)


def _space_values(space: Space) -> dict[str, Any]:
    """The space as YAML-style data, so a resumed search needs no space file."""
    params = {}
    for p in space.params.values():
        if p.kind == "fixed":
            params[p.name] = p.args
        else:
            params[p.name] = {p.kind: p.args, **({"when": p.when} if p.when else {})}
    return {"description": space.description, "search": space.settings, "params": params}


def run_search(
    search: SearchConfig,
    data_cfg: DataConfig,
    progress: bool = True,
    given: frozenset[str] = frozenset(),
) -> Path:
    """Runs (or resumes) a search; returns the experiment folder. `given`: the SearchConfig
    and DataConfig fields the user set explicitly (the CLI's flags), checked on a resume
    against the search's own even where they equal the defaults."""
    exp_dir, name = experiment_dir(search)
    if search.mlflow:  # an unreachable server: said now, not by a callback halfway through
        from .mlflow_runs import check_server

        check_server(search.mlflow)
    if search.study_storage and not search.resume:
        check_storage(search.study_storage, name, fresh=True)
    mirror = _working_copy(search, exp_dir, name) if is_remote(search.storage) else None
    if search.resume and mirror is None:
        _check_resumable(exp_dir, name)  # before the lock, which would make the folder
    say = logging.getLogger("tune_age.progress").info
    held = False  # whether this driver holds the store's driver.lock (else it is another's)
    try:
        with DriverLock(exp_dir) as lock:  # before anything reads the experiment's state
            if lock.took_over:
                say(lock.took_over)
            if mirror is not None:  # this machine's lock is ours: now the store's
                took_over = _join_store(mirror, search.resume)
                held = True
                if took_over:
                    say(took_over)
            lock.mirror = mirror
            try:
                out = _run(make_plan(search), search, data_cfg, progress, given, lock)
            finally:
                if mirror is not None and held and (exp_dir / META_FILE).is_file():
                    _quietly(mirror.push, "upload the experiment's last state to")  # whatever ended the run
    finally:
        if mirror is not None and held:
            _quietly(mirror.drop_lock, "remove the driver's heartbeat from")
    if mirror is not None:
        _quietly(mirror.fetch_all, "download the trials' folders for the summary from")
    return out


def _join_store(mirror: Mirror, resume: bool) -> str | None:
    """Under this machine's lock: refuses when a live driver elsewhere has the experiment,
    pulls tune_age's files for a resume, and puts this driver's heartbeat in the store at
    once; a message when a dead driver's heartbeat was there."""
    try:
        other = mirror.remote_driver()
        if other is not None and other[0]:
            raise TuneAgeError(f"{mirror.name!r} is being run by another driver ({other[1]}); wait for it "
                               "to end, or stop it and resume")
        if resume:
            mirror.pull(tuple(f for f in OWN_FILES if f != LOCK_FILE))
        mirror.push()
    except OSError as exc:
        raise TuneAgeError(f"{mirror.remote.uri}: {str(exc).splitlines()[0][:300]}") from None
    return f"took over the lock of a driver that is no longer running ({other[1]})" if other else None


def _quietly(step, what: str) -> None:
    try:
        step()
    except OSError as exc:  # the store briefly away: said, without hiding why the run ended
        log.warning("could not %s the object store: %s", what, str(exc).splitlines()[0][:300])


def _working_copy(search: SearchConfig, exp_dir: Path, name: str) -> Mirror:
    """The driver's working copy of an experiment in an object store, before its lock: the
    name checked (there for a resume, free for a new search), an old copy cleared unless a
    driver here still runs it. _join_store pulls the store's files, under the lock."""
    remote = remote_storage(search.storage)
    mirror = Mirror(exp_dir, remote, name)
    there = remote.exists(name, META_FILE)
    if search.resume and not there:
        raise TuneAgeError(f"cannot resume {name!r}: {remote.uri}/{name} holds no tune_age search; check "
                           "--name and --storage, or start a new search without --resume")
    if not search.resume and there:
        raise TuneAgeError(f"experiment {name!r} already exists in {remote.uri}; add --resume to continue it "
                           "or choose another --name (tune_age never overwrites a search)")
    from .lock import driver_alive

    if exp_dir.exists() and not driver_alive(exp_dir):
        shutil.rmtree(exp_dir)  # an old working copy: the store's files are the search's
    return mirror


def _run(plan: Plan, search: SearchConfig, data_cfg: DataConfig, progress: bool,
         given: frozenset[str], lock: DriverLock) -> Path:
    """The search, under the experiment's driver lock."""
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    from .searcher import CountedSearch, StudySearch
    from .trainable import train_trial

    if not search.address and not search.resume:
        import ray

        if not ray.is_initialized():
            plan_resources(search, local_resources())  # fail before decoding and Ray when we can
    meta = None
    if search.resume:
        meta = json.loads((plan.exp_dir / META_FILE).read_text())
        asked = search.num_samples
        search, data_cfg = resumed_settings(meta, search, data_cfg, given)
        if asked and asked > plan.num_samples:
            plan.num_samples = asked  # --resume --num-samples N grows the search
        if search.mlflow:  # the resumed search logs where it began logging
            from .mlflow_runs import check_server

            check_server(search.mlflow)
        if search.study_storage:
            check_storage(search.study_storage, plan.name, fresh=False)
    warm, warm_note = [], None
    if search.warm_start and not search.resume:  # a resumed search's study has them already
        from .warm import describe, warm_trials

        warm, left_out = warm_trials(search.warm_start, plan.space, plan.max_epochs, search.metric)
        warm_note = {"from": str(Path(search.warm_start).expanduser().resolve()), "trials": len(warm),
                     "left_out": dict(left_out)}
    weights = pretrained_weights(plan, search.weights_dir)
    source = find_source(data_cfg)  # fails fast on a bad path; draws built-in faces (forks) before threads
    # The data loads in a thread while Ray starts here (each takes seconds; ray.init stays in
    # this thread: Linux stops the processes it starts when the thread that started them ends).
    loaded = in_thread(_load_checked, plan, search, data_cfg, source, meta, progress)
    remote = remote_storage(search.storage) if is_remote(search.storage) else None
    import ray

    had_ray = ray.is_initialized()
    try:
        start_ray(search.address, aws_env() if remote else None)
    except Exception:
        loaded()  # bad data is the error to tell: it was found first before Ray started beside it
        raise
    try:
        data, folds, why = loaded()
    except BaseException:
        if not had_ray:  # the search stops before it began: as if Ray had not been started
            ray.shutdown()
        raise
    if meta is not None and plan.num_samples > meta["num_samples"]:
        write_json_atomic(plan.exp_dir / META_FILE, {**meta, "num_samples": plan.num_samples})
    used_before = float((meta or {}).get("time_used_s", 0.0))
    cpus, gpus = plan_resources(search, ray.cluster_resources())
    say = logging.getLogger("tune_age.progress").info
    say(f"data: {data.source}; groups: {', '.join(data.groups.names)}")
    here = ray.get_runtime_context().get_node_id()
    say("images: " + hand_over(data, search.memory_map, store_capacity(), here))
    # Trials on other nodes fetch a mapped file from the driver's node once per node; the
    # server lives as long as this reference (a node that joins later starts it, if need be).
    server = file_server(list(data.mapped.values())) if data.mapped and len(
        [n for n in ray.nodes() if n.get("Alive")]) > 1 else None
    say(f"space: {plan.space.source} ({len(plan.space.searched)} searched parameters); "
    f"{plan.num_samples} trials x up to {plan.max_epochs} epochs; "
    f"{cpus:g} CPU and {gpus:g} GPU per trial")
    slots = trial_slots(cpus, gpus, ray.cluster_resources(), search.max_concurrent)
    say(f"up to {slots} trials at once; experiment: {plan.exp_dir}")
    say(f"cross-validation: {folds} folds of train+val per trial ({why})" if folds > 1
        else f"validation: one split ({why})")
    # With a custom searcher Ray starts one trial at a time unless told how many
    # may be pending; a ConcurrencyLimiter would do it too but loses count on restore.
    os.environ["TUNE_MAX_PENDING_TRIALS_PG"] = str(slots)
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", CHECKPOINT_PERIOD_S)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # our TrialLog prints progress; verbose=0 silences Ray
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if warm_note is not None:
        say(describe(len(warm), Counter(warm_note["left_out"]), search.warm_start))
    if not search.resume:
        write_meta(plan, search, data_cfg, data, {"folds": folds, "why": why}, warm_note)
    deletes = DeferredDeletes() if remote is not None else None
    if deletes is not None:
        deletes.install()
    lock.on_beat = lambda elapsed: _beat(plan.exp_dir, used_before + elapsed, lock.mirror, deletes)
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, data=data, max_epochs=plan.max_epochs, metric=search.metric,
                             weights=weights, cv=folds, measure=len(search.objective_list) > 1),
        {"cpu": cpus, "gpu": gpus},
    )
    # with_parameters has put the data into Ray's object store, where every trial on this
    # node maps it (or, for images handed over by file, their file names); the driver's own
    # copy would only hold the data set twice.
    del data
    callbacks = [TrialLog(plan.exp_dir, search.metric, search.mode, plan.max_epochs)]
    if search.mlflow:
        from .mlflow_runs import MLflowRuns

        callbacks.append(MLflowRuns(search.mlflow, plan.name, search.metric, plan.exp_dir))
        say(f"MLflow: each trial a run in experiment {plan.name!r} at {search.mlflow}")
    run_config = tune.RunConfig(
        name=plan.name,
        storage_path=remote.path if remote else str(plan.exp_dir.parent),
        storage_filesystem=remote.fs if remote else None,
        # An object store: Ray's state uploaded as often as it is saved, so that a killed
        # driver loses as little there as on a disk (Ray's default waits 5 minutes).
        sync_config=tune.SyncConfig(sync_period=int(CHECKPOINT_PERIOD_S)) if remote else None,
        checkpoint_config=tune.CheckpointConfig(
            num_to_keep=2, checkpoint_score_attribute=SCORE_KEY, checkpoint_score_order="max"
        ),
        failure_config=tune.FailureConfig(max_failures=search.max_failures),
        callbacks=callbacks,
        verbose=0,
    )
    if search.resume:
        from .searcher import STUDY_URLS

        # Where this driver keeps the experiment's files (another machine's copy has other paths).
        RELOCATED[plan.name] = plan.exp_dir
        STUDY_URLS[plan.name] = study_url(plan.exp_dir, {"search": search.to_dict()})
        tuner = tune.Tuner.restore(
            remote.child(plan.name) if remote else str(plan.exp_dir), trainable, resume_unfinished=True,
            resume_errored=True, storage_filesystem=remote.fs if remote else None,
        )
    else:
        searcher = StudySearch(
            plan.space,
            metric=search.metric,
            mode=search.mode,
            max_epochs=plan.max_epochs,
            storage_url=study_url(plan.exp_dir, {"search": search.to_dict()}),
            study_name=plan.name,
            seed=search.seed,
            sampler=search.searcher,
            num_samples=plan.num_samples,
            baseline=plan.baseline.to_dict() if plan.baseline else None,
            warm=warm,
            objectives=search.objective_list,
        )
        scheduler = (
            BaselineFullBudgetASHA(time_attr="epoch", max_t=plan.max_epochs,
                                   grace_period=plan.grace_period, reduction_factor=plan.reduction_factor,
                                   trial_log=plan.exp_dir / TRIALS_FILE)
            if search.scheduler == "asha" else FIFOScheduler()
        )
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                metric=search.metric,
                mode=search.mode,
                search_alg=CountedSearch(searcher, plan.exp_dir / META_FILE),
                scheduler=scheduler,
                num_samples=plan.num_samples,
                max_concurrent_trials=search.max_concurrent,
                time_budget_s=search.time_budget_min * 60 if search.time_budget_min else None,
                reuse_actors=True,  # skips a worker start (and torch import) per trial
                trial_name_creator=trial_name,
                trial_dirname_creator=trial_name,
            ),
            run_config=run_config,
        )
    try:
        tuner.fit()
    finally:
        if deletes is not None:  # Ray's final state is uploaded: nothing waits for them now
            deletes.uninstall()
        del server  # the mapped files' server (if any) ends with the trials
    lock.beat()
    finish_statuses(plan, search, used_before + time.time() - lock.started)
    return plan.exp_dir


def same_data(meta: dict[str, Any], data: FaceData) -> bool:
    """Whether `data` is the search's: the same files where they were, or the same images,
    labels and split read from another place (another machine, a moved copy)."""
    return data.fingerprint == meta.get("data_fingerprint") or (
        bool(data.content) and data.content == meta.get("data_content"))


def _beat(exp_dir: Path, used_s: float, mirror: Mirror | None, deletes: DeferredDeletes | None = None) -> None:
    """Every heartbeat of the driver: the time used, the store's copy brought up to date,
    checkpoints Ray dropped long enough ago deleted."""
    _record_time(exp_dir, used_s)
    if mirror is not None:
        try:
            if deletes is not None:
                deletes.run()
            mirror.push()
        except Exception as exc:  # a store that is briefly away: the next beat tries again
            log.warning("could not upload to %s: %s", mirror.remote.uri, str(exc).splitlines()[0][:200])


def _record_time(exp_dir: Path, used_s: float) -> None:
    """The driver's time on this search, all runs together: what a time budget is against."""
    meta = json.loads((exp_dir / META_FILE).read_text())
    write_json_atomic(exp_dir / META_FILE, {**meta, "time_used_s": round(used_s, 1)})


class SearchInterrupted(Exception):
    """The search stopped before all its trials ended (Ctrl-C); its state is saved."""


def finish_statuses(plan: Plan, search: SearchConfig, used_s: float) -> None:
    """After Tuner.fit: an unfinished trial means an interrupt, unless the time budget (against
    the time of every run of this search, `used_s`) ran out; budget-stopped trials are told to
    the study as pruned at their last epoch, interrupted ones stay running there, to resume."""
    from .searcher import close_trials

    path = plan.exp_dir / TRIALS_FILE
    trials = read_trials(path)
    unfinished = [t for t in trials.values() if t["status"] not in FINAL]
    if len(trials) - len(unfinished) >= plan.num_samples:
        for t in unfinished:  # asked for just before a crash of the driver; Ray never ran them
            t["status"] = "lost"
        if unfinished:
            write_json_atomic(path, trials)
        return
    if search.time_budget_min and used_s >= search.time_budget_min * 60 - BUDGET_SLACK_S:
        for t in unfinished:
            t["status"] = "stopped"
        write_json_atomic(path, trials)
        close_trials(study_url(plan.exp_dir, {"search": search.to_dict()}), plan.name, unfinished)
        logging.getLogger("tune_age.progress").info(
            "time budget of %g min used up; %d trial(s) stopped", search.time_budget_min, len(unfinished))
        return
    for t in unfinished:
        t["status"] = "interrupted"
    write_json_atomic(path, trials)
    raise SearchInterrupted(plan.name)


# Ray's stopper and our heartbeat (lock.HEARTBEAT_S) each lose a few seconds of a killed
# driver's time: a search within this of its budget has used it up.
BUDGET_SLACK_S = 10.0
KEPT_ON_RESUME = ("name", "storage", "address", "resume", "num_samples", "weights_dir", "cache_dir",
                  "memory_map")
FLAGS = {"time_budget_min": "--time-budget", "baseline_first": "--no-baseline", "path": "--data",
         "format": "--layout"}


def resumed_settings(meta: dict, search: SearchConfig, data_cfg: DataConfig,
                     given: frozenset[str] = frozenset()) -> tuple[SearchConfig, DataConfig]:
    """The search's own settings for a resume. A setting this command gives (by flag, or by a
    value other than the default) that differs from the search's is a ConfigError naming both;
    --num-samples may only grow the search; where to find Ray, results and weights may change."""
    own = SearchConfig.from_dict({**meta["search"], "resume": True, "address": search.address,
                                  "storage": search.storage, "weights_dir": search.weights_dir,
                                  "memory_map": search.memory_map})
    own_data = DataConfig.from_dict(meta["data"])
    resolved = {"max_epochs": meta["max_epochs"], "num_samples": meta["num_samples"]}
    for mine, theirs, default in ((search, own, SearchConfig()), (data_cfg, own_data, DataConfig())):
        for name, value in mine.to_dict().items():
            if name not in given and value == getattr(default, name):
                continue
            before = resolved.get(name, getattr(theirs, name)) if mine is search else getattr(theirs, name)
            flag = FLAGS.get(name, "--" + name.replace("_", "-"))
            if name == "num_samples" and value is not None and value < before:
                raise ConfigError(f"--num-samples {value}: {meta['name']!r} already has {before} trials; "
                                  "a resumed search can grow (a larger --num-samples), not shrink")
            if name in KEPT_ON_RESUME or _same(name, value, before):
                continue
            if name == "baseline_first":  # --no-baseline on: the seed baseline left out
                value, before = ("off" if value else "on"), ("off" if before else "on")
            raise ConfigError(
                f"{flag} {value}: {meta['name']!r} was started with {flag} {before}; a resumed search "
                "keeps the settings it began with (leave the option out, or start a new search "
                "under another --name)"
            )
    return own, own_data


def _same(name: str, a: Any, b: Any) -> bool:
    if name == "path" and a is not None and b is not None:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    return a == b
