"""`--mlflow URI`: each trial a run on an MLflow tracking server, through Ray's MLflow callback.

    callbacks.append(MLflowRuns("http://127.0.0.1:5000", "search-20261202", "val_acc"))

A run per trial in the MLflow experiment named after the search: its hyperparameters as
parameters, its epochs' metrics (val_*, train_*, images_per_sec) with the epoch as the step,
tags for the trial id, the tune_age experiment folder and whether it is the seed baseline,
and at its end its best checkpoint (by the search's metric, as `tune-age export` picks) as
the artifact `best_checkpoint/`. A resumed search finds each trial's run by its tag and
goes on logging into it. `check_server` makes an unreachable server a one-line error before
the search starts, not a traceback in the middle of it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ray.air.integrations.mlflow import MLflowLoggerCallback

from ..errors import ConfigError

TRIAL_TAG = "tune_age.trial_id"
LOGGED = ("val_", "train_")  # result keys logged as metrics, with these
MEASURES = ("images_per_sec", "latency_ms", "latency64_ms", "params")


def check_server(uri: str) -> None:
    """A ConfigError naming the URI when mlflow is missing or the server does not answer."""
    try:
        import mlflow
    except ImportError:
        raise ConfigError(f"--mlflow {uri}: mlflow is not installed; pip install 'tune_age[mlflow]'") from None
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    try:
        mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as exc:  # a refused connection, a wrong scheme, a server error
        why = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise ConfigError(f"--mlflow {uri}: the MLflow tracking server did not answer ({why}); start it "
                          "(mlflow server --host 127.0.0.1 --port 5000) or give its URI") from None


class MLflowRuns(MLflowLoggerCallback):
    def __init__(self, tracking_uri: str, experiment_name: str, metric: str, exp_dir: str | Path):
        super().__init__(tracking_uri, experiment_name=experiment_name,
                         tags={"tune_age.experiment": str(exp_dir)})
        self.metric = metric

    def log_trial_start(self, trial: Any) -> None:
        if trial not in self._trial_runs:  # a resumed search: the trial's run from before, if any
            found = self.mlflow_util._get_client().search_runs(
                [self.mlflow_util.experiment_id], filter_string=f"tags.`{TRIAL_TAG}` = '{trial.trial_id}'",
                max_results=1)
            if found:
                self._trial_runs[trial] = found[0].info.run_id
                self.mlflow_util._get_client().set_terminated(found[0].info.run_id, status="RUNNING")
                return
            baseline = bool(trial.config.get("_baseline"))
            self.tags = {**self.tags, TRIAL_TAG: trial.trial_id, "tune_age.baseline": str(baseline)}
        super().log_trial_start(trial)

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        metrics = {k: v for k, v in result.items()
                   if (k.startswith(LOGGED) or k in MEASURES) and isinstance(v, (int, float))}
        self.mlflow_util.log_metrics(run_id=self._trial_runs[trial], metrics_to_log=metrics,
                                     step=int(result.get("epoch") or iteration))

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        import tempfile

        import pyarrow.fs as pafs

        from ..results.export import best_of, trial_checkpoints

        fs = trial.storage.storage_filesystem
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(trial.path)
            if not isinstance(fs, pafs.LocalFileSystem):  # an object store: its checkpoints, copied here
                folder = Path(tmp) / "trial"
                for info in fs.get_file_info(pafs.FileSelector(trial.path)):
                    if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_"):
                        pafs.copy_files(info.path, str(folder / info.base_name), source_filesystem=fs)
            best = best_of(trial_checkpoints(folder), self.metric)
            if best is not None:
                run_id = self._trial_runs[trial]
                client = self.mlflow_util._get_client()
                client.log_artifacts(run_id, str(best.path.parent), artifact_path="best_checkpoint")
                client.set_tag(run_id, "tune_age.best_epoch", str(best.epoch))
        super().log_trial_end(trial, failed)
