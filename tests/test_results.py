"""After a search: trial tables, the report, export, predict and evaluate.

Most tests read the folder of the real 4-trial search (`small_search`, conftest.py);
export's choice of checkpoint is also tested on a small experiment folder written by
hand, where the best epoch is deliberately not the last one. CLI tests call
`tune_age.cli.main` in-process and check the exit code and the printed output.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from PIL import Image

from tune_age.cli import main
from tune_age.config import DataConfig, TrainConfig
from tune_age.data import load_data
from tune_age.data.groups import make_groups
from tune_age.training.engine import Normalizer, evaluate, predict_logits
from tune_age.errors import ArtifactError, TuneAgeError
from tune_age.results.export import Packaged, best_checkpoint, load_model, payload_sha256
from tune_age.models import build_model
from tune_age.results.predict import evaluate_arrays
from tune_age.results.report import param_importance
from tune_age.results import STATUSES, load_experiment, render, trials_table
from tune_age.search.tracking import TRIALS_FILE, write_json_atomic

pytestmark = pytest.mark.slow


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("tune-age: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def exported(small_search, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "best.pt"
    assert main(["export", str(small_search), "--out", str(out), "--pt2"]) == 0
    return out


@pytest.fixture(scope="module")
def search_data(small_search):
    """The search's data, rebuilt from its tune_age.json (decoded images come from the cache)."""
    meta = json.loads((small_search / "tune_age.json").read_text())
    sizes = {int(torch.load(file, weights_only=True, mmap=True)["image_size"])
             for file in small_search.glob("*/checkpoint_*/checkpoint.pt")}
    return load_data(DataConfig.from_dict(meta["data"]), sorted(sizes), progress=False)


# --- a hand-written experiment folder ------------------------------------------------------

TINY = TrainConfig(conv_layers=1, channels=4, fc_layers=1, image_size=16, batch_norm=False)
GROUPS = make_groups("decades")


def fake_checkpoint(folder: Path, epoch: int, metrics: dict, seed: int) -> Path:
    torch.manual_seed(seed)
    model = build_model(TINY, len(GROUPS), 16)
    state = {
        "format": "tune_age.checkpoint", "version": 1, "model": model.state_dict(),
        "config": TINY.to_dict(), "groups": GROUPS.to_dict(),
        "norm": {"mean": [0.5] * 3, "std": [0.25] * 3}, "image_size": 16, "epoch": epoch,
        "metrics": {"epoch": epoch, **metrics}, "history": [], "data_fingerprint": "f" * 64,
    }
    folder.mkdir(parents=True)
    torch.save(state, folder / "checkpoint.pt")
    return folder / "checkpoint.pt"


def fake_experiment(root: Path, trials: dict[str, dict]) -> Path:
    """trials: id -> {"status", "checkpoints": {epoch: metrics}}; writes meta, the trial log, checkpoints."""
    root.mkdir(parents=True)
    meta = {"name": root.name, "metric": "val_acc", "mode": "max", "num_samples": len(trials),
            "max_epochs": 3, "data": DataConfig().to_dict(), "groups": GROUPS.to_dict(),
            "space": {"name": "test", "source": "test", "values": {"params": {}}},
            "data_fingerprint": "f" * 64, "data_source": "by hand"}
    (root / "tune_age.json").write_text(json.dumps(meta))
    entries = {}
    for n, (tid, spec) in enumerate(trials.items()):
        points = spec.get("checkpoints", {})
        for epoch, metrics in points.items():
            fake_checkpoint(root / f"trial_{tid}" / f"checkpoint_{epoch - 1:06d}", epoch, metrics, 10 * n + epoch)
        scores = {e: m["val_acc"] for e, m in points.items()}
        best_epoch = max(scores, key=scores.get) if scores else None
        entries[tid] = {
            "trial_id": tid, "status": spec["status"], "config": TINY.to_dict(), "dir": f"trial_{tid}",
            "epochs": max(points, default=0), "best": scores.get(best_epoch), "best_epoch": best_epoch,
            "last": points[max(points)] if points else None, "attempts": 1,
            "errors": ["RuntimeError: boom"] if spec["status"] == "errored" else [], "started": n,
        }
    write_json_atomic(root / TRIALS_FILE, entries)
    return root


# --- trial tables --------------------------------------------------------------------------


def test_trials_table_from_a_real_search(small_search):
    exp = load_experiment(small_search)
    table = trials_table(exp)
    assert len(table) == 4
    assert set(table["status"]) <= set(STATUSES)
    assert table["baseline"].sum() == 1
    assert (table["epochs"] <= 3).all() and (table["epochs"] >= 1).all()
    scores = table["best_val_acc"].dropna().tolist()
    assert scores == sorted(scores, reverse=True)
    assert table["trial_id"].iloc[0] == exp.best_trial()["trial_id"]
    for row in table.to_dict("records"):  # best and last agree with each trial's result.json
        history = exp.history(exp.trials[row["trial_id"]])
        values = [r["val_acc"] for r in history if not r.get("diverged")]
        assert row["best_val_acc"] == pytest.approx(max(values))
        assert row["last_val_acc"] == pytest.approx(values[-1])
        assert row["epochs"] == len(history)
    assert len(trials_table(exp, top=2)) == 2
    done = trials_table(exp, status=["completed"])
    assert set(done["status"]) == {"completed"} and len(done) == (table["status"] == "completed").sum()
    by_loss = trials_table(exp, sort="val_loss")
    losses = by_loss["best_val_loss"].tolist()
    assert losses == sorted(losses)  # val_loss: lower is better, so best first is ascending
    by_lr = trials_table(exp, sort="lr", reverse=True)
    assert by_lr["lr"].tolist() == sorted(by_lr["lr"].tolist(), reverse=True)
    picked = trials_table(exp, columns=["trial_id", "lr"])
    assert list(picked.columns) == ["trial_id", "lr"]


def test_trials_cli_every_format_parses(small_search, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    exp = load_experiment(small_search)
    ids = set(exp.trials)

    code, out, _ = run(capsys, "trials", small_search)
    assert code == 0
    assert all(len(line) <= 80 for line in out.splitlines()), out
    assert all(any(line.startswith(t) for line in out.splitlines()) for t in ids)
    best = exp.best_trial()
    assert f"{best['best']:.4f}" in out

    code, out, _ = run(capsys, "trials", small_search, "--format", "csv")
    frame = pd.read_csv(io.StringIO(out))
    assert code == 0 and set(frame["trial_id"].astype(str)) == ids
    assert {"status", "epochs", "best_val_acc", "last_val_acc", "lr"} <= set(frame.columns)

    code, out, _ = run(capsys, "trials", small_search, "--format", "json", "--top", "2")
    rows = json.loads(out)
    assert code == 0 and len(rows) == 2 and rows[0]["trial_id"] == best["trial_id"]

    code, out, _ = run(capsys, "trials", small_search, "--format", "markdown", "--columns",
                       "trial_id,status", "best_val_acc")
    lines = out.strip().splitlines()
    assert code == 0 and lines[0] == "| trial_id | status | best_val_acc |" and len(lines) == 2 + len(ids)

    code, out, _ = run(capsys, "trials", small_search, "--follow", "--interval", "0.01")
    assert code == 0 and out.count(best["trial_id"]) == 1  # a finished search: drawn once


def test_trials_and_export_read_a_storage_uri(small_search, tmp_path, capsys):
    uri = f"local://{small_search}"  # any pyarrow filesystem takes this path: copied, then read
    code, out, _ = run(capsys, "trials", uri, "--format", "json")
    assert code == 0 and {r["trial_id"] for r in json.loads(out)} == set(load_experiment(small_search).trials)
    code, _, _ = run(capsys, "export", uri, "--out", tmp_path / "best.pt")
    assert code == 0 and load_model(tmp_path / "best.pt").provenance["experiment"] == uri
    code, _, err = run(capsys, "trials", f"local://{tmp_path}")
    assert code == 2 and "not a tune_age experiment folder" in one_line_error(err)


@pytest.mark.parametrize("args, message", [
    (["--status", "finished"], "status 'finished' is not valid"),
    (["--sort", "accuracy"], "cannot sort by 'accuracy'"),
    (["--columns", "trial_id,nope"], "unknown column 'nope'"),
    (["--top", "0"], "--top 0 is not valid"),
])
def test_trials_cli_errors(small_search, capsys, args, message):
    code, _, err = run(capsys, "trials", small_search, *args)
    assert code == 2 and message in one_line_error(err)


def test_trials_of_a_folder_that_is_no_experiment(tmp_path, capsys):
    code, _, err = run(capsys, "trials", tmp_path)
    assert code == 2 and "not a tune_age experiment folder" in one_line_error(err)


# --- the report ----------------------------------------------------------------------------


def test_report_holds_the_numbers_of_the_search(small_search, tmp_path, capsys, search_data):
    exp_dir = shutil.copytree(small_search, tmp_path / "exp")  # rerun.json goes into the copy
    out = tmp_path / "report"
    code, stdout, _ = run(capsys, "report", exp_dir, "--out", out, "--rerun-top", "1", "--seeds", "2")
    assert code == 0, stdout
    exp = load_experiment(exp_dir)
    best = exp.best_trial()
    md = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    for name in ("learning_curves.png", "params.png", "history.png", "confusion_val.png",
                 "confusion_test.png", "per_group.png"):
        assert (out / name).stat().st_size > 1000, name
        assert f"({name})" in md
    assert f"{best['best']:.4f}" in md and best["trial_id"] in md
    assert f"best val_acc: {best['best']:.4f}" in stdout
    assert "(seed baseline)" in md
    assert page.count("data:image/png;base64,") >= 6 and 'src="data:image/png' in page
    assert ".png\"" not in page  # every image is embedded, none linked
    # Importance: a table, or a sentence saying there were too few completed trials.
    section = md.split("## Parameter importance")[1].split("##")[0]
    assert "| parameter | importance |" in section or "Too few trials" in section
    # Validation and test metrics of the best checkpoint, recomputed from the rebuilt split.
    ref = best_checkpoint(exp)
    loaded = load_model(ref.path)
    rows = search_data.splits["test"]
    test = evaluate_arrays(loaded, search_data.images[loaded.image_size][rows],
                           search_data.labels[rows], search_data.ages[rows])
    test_section = md.split("## Test split")[1]
    assert f"{test['accuracy']:.4f}" in test_section and f"{test['macro_f1']:.4f}" in test_section
    assert "Note: recomputed" not in md  # validation metrics agree with what the checkpoint stored
    # Calibration: the test split's ECE as trained, recomputed here with numpy (15 bins).
    probs = torch.softmax(predict_logits(loaded.model, torch.from_numpy(search_data.images[loaded.image_size][rows]),
                                         norm=loaded.normalizer()), 1).numpy()
    confidence, correct = probs.max(1), probs.argmax(1) == search_data.labels[rows]
    bins = np.clip(np.ceil(confidence * 15).astype(int) - 1, 0, 14)
    ece = sum((bins == b).mean() * abs(confidence[bins == b].mean() - correct[bins == b].mean())
              for b in range(15) if (bins == b).any())
    calibration = md.split("## Calibration")[1].split("\n## ")[0]
    assert f"| test | {len(rows)} | {ece:.4f} |" in calibration and "(reliability.png)" in calibration
    # By group of people: the synthetic faces' UTKFace names carry gender and race.
    people = md.split("## Accuracy by group of people")[1].split("\n## ")[0]
    gender = pd.Series([Path(search_data.paths[i]).name.split("_")[1] for i in rows])
    for code_, name in (("0", "male"), ("1", "female")):
        mask = (gender == code_).to_numpy()
        acc = (test["pred"][mask] == search_data.labels[rows][mask]).mean()
        assert f"| {name} | {mask.sum()} | {acc:.3f} |" in people
    assert "### By race" in people and "### By age group" in people and "(people.png)" in people
    # Seed reruns: kept in the experiment, shown in the report.
    rerun = json.loads((exp_dir / "rerun.json").read_text())
    assert len(rerun["configs"]) == 1 and len(rerun["configs"][0]["scores"]) == 2
    assert rerun["configs"][0]["trial_id"] == best["trial_id"]
    assert "## Seed reruns" in md and f"{rerun['configs'][0]['mean']:.4f}" in md


def chromium() -> str | None:
    """Debian's chromium (.ci/run installs it); None outside CI when missing, a failure in CI."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and os.environ.get("CI") == "true":
        pytest.fail("chromium is not installed; .ci/run installs Debian's chromium package")
    return found


@pytest.mark.skipif(chromium() is None, reason="needs chromium (in CI its absence fails the test)")
def test_report_fits_a_1280px_browser_window_with_every_image_loaded(small_search, tmp_path):
    from playwright.sync_api import sync_playwright

    from tune_age.results.report import write_report

    page_file = write_report(small_search, out=tmp_path / "report").html
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium(), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(page_file.as_uri())
        found = page.evaluate("""() => {
            const width = document.documentElement.clientWidth;
            const wide = [...document.querySelectorAll('body *')]
                .filter(e => e.getBoundingClientRect().right > width + 0.5 || e.scrollWidth > e.clientWidth + 1)
                .map(e => e.tagName + ': ' + e.textContent.slice(0, 40));
            return {width, page: document.documentElement.scrollWidth, wide,
                    images: [...document.images].map(i => i.complete && i.naturalWidth > 0),
                    tables: document.querySelectorAll('table').length};
        }""")
        page.screenshot(path=str(tmp_path / "report-1280.png"), full_page=True)
        browser.close()
    assert found["width"] == 1280 and found["page"] <= 1280, found
    assert found["wide"] == [], found["wide"]  # no element past the window, nothing scrolled inside one
    assert len(found["images"]) >= 8 and all(found["images"]), found["images"]
    assert found["tables"] >= 4 and (tmp_path / "report-1280.png").stat().st_size > 50_000


def study_with(tmp_path: Path, n: int) -> Path:
    """n search trials over 3 epochs (ASHA rungs at 1 and 3): where lr is off by more than a
    decade from 0.01 the trial is poor at epoch 1 and pruned there; the others complete, their
    final value set by conv_layers. Over completed trials only, lr would look unimportant."""
    exp = fake_experiment(tmp_path / f"imp{n}", {})
    meta = json.loads((exp / "tune_age.json").read_text())
    (exp / "tune_age.json").write_text(json.dumps({**meta, "grace_period": 1, "reduction_factor": 3}))
    study = optuna.create_study(study_name=exp.name, storage=f"sqlite:///{exp / 'study.db'}",
                                direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    rng = np.random.default_rng(0)
    for _ in range(n):
        trial = study.ask()
        lr = trial.suggest_float("lr", 1e-5, 1.0, log=True)
        layers = trial.suggest_int("conv_layers", 1, 4)
        if abs(math.log10(lr) + 2) > 1:
            trial.report(0.1 + 0.01 * rng.random(), 1)
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            for epoch in (1, 2, 3):
                trial.report(0.4 + 0.01 * rng.random(), epoch)
            study.tell(trial, 0.4 + 0.1 * layers + 0.01 * rng.random())
    baseline = study.ask()
    baseline.set_user_attr("baseline", True)
    baseline.report(0.9, 1)
    study.tell(baseline, 0.9)
    return exp


def test_parameter_importance_counts_pruned_trials_at_a_rung_or_gives_a_clear_reason(tmp_path):
    exp = study_with(tmp_path, 24)
    pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in optuna.load_study(
        study_name=exp.name, storage=f"sqlite:///{exp / 'study.db'}").trials)
    assert 10 <= 24 - pruned  # enough completed trials that the deepest rung is epoch 3 ...
    scores, note = param_importance(load_experiment(exp))
    assert set(scores) == {"lr", "conv_layers"}
    assert f"From {24 - pruned} search trials at epoch 3" in note  # ... where conv_layers decides
    assert scores["conv_layers"] > scores["lr"]
    exp = study_with(tmp_path, 14)  # too few reach epoch 3: epoch 1, pruned trials in, lr decides
    scores, note = param_importance(load_experiment(exp))
    assert "From 14 search trials at epoch 1" in note and "later stopped by ASHA" in note, note
    assert scores["lr"] > scores["conv_layers"]
    scores, note = param_importance(load_experiment(study_with(tmp_path, 6)))
    assert scores is None and "at most 6 search trial(s) reached" in note and "at least 10 needed" in note
    damaged = fake_experiment(tmp_path / "damaged", {})
    (damaged / "study.db").write_bytes(b"not a database")
    scores, note = param_importance(load_experiment(damaged))
    assert scores is None and "study.db could not be read" in note


# --- export --------------------------------------------------------------------------------


def test_export_picks_the_best_epoch_not_the_last(tmp_path, capsys):
    exp = fake_experiment(tmp_path / "exp", {
        "aaaa": {"status": "completed", "checkpoints": {
            2: {"val_acc": 0.60, "val_loss": 1.5}, 3: {"val_acc": 0.40, "val_loss": 1.2}}},
        "bbbb": {"status": "completed", "checkpoints": {
            2: {"val_acc": 0.50, "val_loss": 1.1}, 3: {"val_acc": 0.55, "val_loss": 1.0}}},
    })
    out = tmp_path / "best.pt"
    code, stdout, _ = run(capsys, "export", exp, "--out", out)
    assert code == 0 and "trial aaaa, epoch 2, val_acc 0.6000" in stdout
    state = torch.load(out, weights_only=True)
    assert state["provenance"]["trial_id"] == "aaaa" and state["provenance"]["epoch"] == 2
    assert state["metrics"]["val_acc"] == 0.60
    source = torch.load(exp / "trial_aaaa" / "checkpoint_000001" / "checkpoint.pt", weights_only=True)
    for name, tensor in source["model"].items():
        assert torch.equal(state["model"][name], tensor), name
    # Another metric, another winner: the lowest val_loss kept is trial bbbb's last epoch;
    # an even lower one whose checkpoint Ray dropped is pointed out.
    reported = [{"epoch": 1, "val_acc": 0.1, "val_loss": 0.5}, {"epoch": 2, "val_acc": 0.6, "val_loss": 1.5}]
    (exp / "trial_aaaa" / "result.json").write_text("".join(json.dumps(r) + "\n" for r in reported))
    code, stdout, _ = run(capsys, "export", exp, "--out", tmp_path / "loss.pt", "--metric", "val_loss")
    assert code == 0 and "trial bbbb, epoch 3, val_loss 1.0000" in stdout
    assert "trial aaaa epoch 1 reported val_loss 0.5000, but Ray kept no checkpoint" in stdout


def test_export_of_the_real_search_is_its_best_epoch(small_search, exported):
    exp = load_experiment(small_search)
    reported = [r["val_acc"] for t in exp.trials.values() for r in exp.history(t) if not r.get("diverged")]
    state = torch.load(exported, weights_only=True)
    assert state["metrics"]["val_acc"] == pytest.approx(max(reported))
    prov = state["provenance"]
    assert prov["data_fingerprint"] == exp.meta["data_fingerprint"]
    assert Path(prov["experiment"]) == small_search.resolve()
    assert (small_search / prov["checkpoint"]).is_file()
    assert state["groups"]["names"] == exp.meta["groups"]["names"]
    assert set(state["norm"]) == {"mean", "std"} and isinstance(state["image_size"], int)
    assert state["sha256"] == payload_sha256({k: v for k, v in state.items() if k != "sha256"})


def test_export_never_overwrites_without_force(small_search, exported, capsys):
    before = exported.read_bytes()
    code, _, err = run(capsys, "export", small_search, "--out", exported)
    assert code == 2 and "already exists" in one_line_error(err) and "--force" in err
    assert exported.read_bytes() == before
    copy = exported.with_name("again.pt")
    shutil.copy(exported, copy)
    assert run(capsys, "export", small_search, "--out", copy, "--force")[0] == 0
    assert load_model(copy).kind == "export"


def test_the_best_model_never_comes_from_a_failed_trial(tmp_path, capsys):
    exp = fake_experiment(tmp_path / "exp", {
        "aaaa": {"status": "diverged", "checkpoints": {1: {"val_acc": 0.9, "val_loss": 0.5}}},
        "bbbb": {"status": "errored", "checkpoints": {1: {"val_acc": 0.8, "val_loss": 0.5}}},
        "cccc": {"status": "completed", "checkpoints": {3: {"val_acc": 0.4, "val_loss": 1.0}}},
    })
    code, stdout, _ = run(capsys, "export", exp, "--out", tmp_path / "best.pt")
    assert code == 0 and "trial cccc, epoch 3" in stdout
    assert load_experiment(exp).best_trial()["trial_id"] == "cccc"


def test_export_without_a_completed_trial(tmp_path, capsys):
    exp = fake_experiment(tmp_path / "failed", {"aaaa": {"status": "errored"},
                                                "bbbb": {"status": "diverged"}})
    code, _, err = run(capsys, "export", exp, "--out", tmp_path / "best.pt")
    line = one_line_error(err)
    assert code == 2 and "no completed trial" in line and "1 errored" in line
    assert not (tmp_path / "best.pt").exists()


def test_pt2_program_has_the_preprocessing_built_in_and_takes_any_size(exported, small_search, capsys):
    loaded = load_model(exported)
    program = torch.export.load(exported.with_name("best.pt2"))
    meta = json.loads(_extra(exported.with_name("best.pt2")))
    assert meta["groups"]["names"] == loaded.groups.names and meta["export_sha256"] == loaded.sha256
    run_it = program.module()
    size = loaded.image_size
    images = torch.randint(0, 256, (3, 3, size, size), dtype=torch.uint8)
    expected = torch.softmax(predict_logits(loaded.model, images, norm=loaded.normalizer()), 1)
    with torch.no_grad():
        assert torch.allclose(run_it(images), expected, atol=1e-5)
        for h, w in ((size, 2 * size), (3 * size, size), (size + 7, size + 1)):  # wide, tall, odd
            photo = torch.randint(0, 256, (2, 3, h, w), dtype=torch.uint8)
            assert torch.allclose(run_it(photo), Packaged(loaded.model, loaded.mean, loaded.std, size,
                                                          loaded.square)(photo), atol=1e-5)
    # The old flag says what replaced it, in one line.
    code, _, err = run(capsys, "export", small_search, "--out", exported.with_name("old.pt"), "--torchscript")
    assert code == 2 and "--torchscript was replaced by --pt2" in one_line_error(err)
    assert not exported.with_name("old.pt").exists()


def _extra(path: Path) -> str:
    extra = {"tune_age.json": ""}
    torch.export.load(path, extra_files=extra)
    return extra["tune_age.json"]


def test_onnx_export_runs_in_onnxruntime_as_predict_does_or_is_not_written(small_search, tmp_path, capsys, monkeypatch):
    import onnx
    import onnxruntime

    import tune_age.results.export as export

    out = tmp_path / "best.pt"
    assert main(["export", str(small_search), "--out", str(out), "--onnx"]) == 0
    printed = capsys.readouterr().out
    assert "onnxruntime agrees with PyTorch on" in printed and "same groups" in printed
    model = onnx.load(str(tmp_path / "best.onnx"))
    meta = json.loads({p.key: p.value for p in model.metadata_props}["tune_age"])
    loaded = load_model(out)
    assert meta["groups"]["names"] == loaded.groups.names and meta["provenance"]["trial_id"]
    # A non-square photo: the ONNX model's probabilities are predict's (one preprocessing).
    photo = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 140, 3), dtype=np.uint8)).save(photo)
    session = onnxruntime.InferenceSession(str(tmp_path / "best.onnx"), providers=["CPUExecutionProvider"])
    pixels = np.asarray(Image.open(photo).convert("RGB")).transpose(2, 0, 1)[None].copy()
    probs = session.run(None, {"images": np.concatenate([pixels, pixels])})[0]
    code, stdout, _ = run(capsys, "predict", out, photo, "--format", "json", "--top", str(len(loaded.groups)))
    expected = {t["group"]: t["probability"] for t in json.loads(stdout)[0]["top"]}
    assert probs.shape == (2, len(loaded.groups))
    for name, p in zip(loaded.groups.names, probs[1]):
        assert p == pytest.approx(expected[name], abs=1e-4)
    # An export that does not agree with PyTorch is refused and leaves no file.
    monkeypatch.setattr(export, "EXPORT_TOLERANCE", -1.0)
    code, _, err = run(capsys, "export", small_search, "--out", tmp_path / "again.pt", "--onnx")
    assert code == 2 and "the ONNX export disagrees with PyTorch" in err and "not written" in err
    assert not (tmp_path / "again.onnx").exists()


def test_calibrated_export_divides_logits_by_the_fitted_temperature_everywhere(small_search, tmp_path, capsys):
    from tune_age.results.calibration import fit_temperature, nll

    out = tmp_path / "cal.pt"
    code, printed, _ = run(capsys, "export", small_search, "--out", out, "--calibrate", "--pt2")
    assert code == 0 and "calibrated: temperature" in printed and "not used to fit" in printed
    loaded = load_model(out)
    t = loaded.temperature
    assert t > 0 and torch.load(out, weights_only=True)["temperature"] == t
    images = torch.randint(0, 256, (4, 3, loaded.image_size, loaded.image_size), dtype=torch.uint8)
    logits = predict_logits(loaded.model, images, norm=loaded.normalizer()).float()
    from tune_age.results.predict import probabilities

    assert torch.allclose(probabilities(loaded, images), torch.softmax(logits / t, 1), atol=1e-6)
    program = torch.export.load(tmp_path / "cal.pt2").module()
    with torch.no_grad():
        assert torch.allclose(program(images), torch.softmax(logits / t, 1), atol=1e-5)
    # The fit minimizes the validation NLL: no worse there than the model as trained.
    from tune_age.results.export import split_images

    z_images, labels = split_images(load_experiment(small_search), loaded.image_size)["val"]
    z = predict_logits(loaded.model, z_images, norm=loaded.normalizer()).float()
    assert nll(z, labels, t) <= nll(z, labels) + 1e-6 and t == pytest.approx(fit_temperature(z, labels), rel=1e-3)
    code, _, err = run(capsys, "export", small_search, "--out", tmp_path / "r.pt", "--calibrate", "--refit")
    assert code == 2 and "--calibrate with --refit" in err


# --- using the model -----------------------------------------------------------------------


def test_exported_model_reproduces_evaluate(small_search, exported, search_data, capsys):
    loaded = load_model(exported)
    images = torch.from_numpy(search_data.images[loaded.image_size].copy())
    labels = torch.from_numpy(search_data.labels.copy())
    direct = evaluate(loaded.model, images, labels, norm=Normalizer(loaded.mean, loaded.std, "cpu"),
                      num_classes=len(loaded.groups), ages=torch.from_numpy(search_data.ages.copy()),
                      centers=loaded.groups.centers)
    folder = Path(search_data.paths[0]).parent  # the synthetic faces, a UTKFace-named folder
    code, out, err = run(capsys, "evaluate", exported, "--data", folder, "--format", "json", "--device", "cpu",
                         "--include-seen")
    assert code == 0, err
    got = json.loads(out)
    for key in ("accuracy", "one_off", "macro_f1", "balanced_accuracy", "mae"):
        assert got[key] == pytest.approx(direct[key], abs=1e-6), key
    assert got["confusion"] == direct["confusion"] and got["n_images"] == len(labels)
    # On the validation split the export gives back the metrics it was chosen by.
    rows = search_data.splits["val"]
    val = evaluate_arrays(loaded, search_data.images[loaded.image_size][rows], search_data.labels[rows])
    assert val["accuracy"] == pytest.approx(loaded.metrics["val_acc"], abs=1e-6)
    code, out, _ = run(capsys, "evaluate", exported, "--data", folder, "--include-seen")
    assert code == 0 and f"accuracy           {direct['accuracy']:.4f}" in out
    # By default only what the model never saw is scored: here, the test split.
    test = search_data.splits["test"]
    honest = evaluate_arrays(loaded, search_data.images[loaded.image_size][test], search_data.labels[test])
    code, out, _ = run(capsys, "evaluate", exported, "--data", folder, "--format", "json")
    got = json.loads(out)
    assert got["n_images"] == len(test) and got["seen"] == len(labels) - len(test)
    assert got["accuracy"] == pytest.approx(honest["accuracy"], abs=1e-6)


def test_predict_a_folder(exported, search_data, tmp_path, capsys):
    folder = tmp_path / "photos"
    (folder / "more").mkdir(parents=True)
    for i, src in enumerate(search_data.paths[:3]):
        shutil.copy(src, (folder if i < 2 else folder / "more") / f"face{i}.jpg")
    Image.new("RGB", (40, 30), (200, 150, 120)).save(folder / "wide.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (folder / "notes.txt").write_text("not an image")
    names = load_model(exported).groups.names

    code, out, err = run(capsys, "predict", exported, folder)
    assert code == 0
    rows = out.strip().splitlines()[1:]
    assert len(rows) == 4
    for row in rows:
        path, group = row.split()[:2]
        assert Path(path).name in {"face0.jpg", "face1.jpg", "face2.jpg", "wide.png"}
        assert group in names
    assert "skipped 1 file" in err and "broken.jpg" in err

    code, out, _ = run(capsys, "predict", exported, folder / "face0.jpg", "--format", "json", "--top", "2")
    (row,) = json.loads(out)
    probs = [t["probability"] for t in row["top"]]
    assert code == 0 and len(probs) == 2 and probs[0] >= probs[1] and row["group"] == row["top"][0]["group"]
    code, out, _ = run(capsys, "predict", exported, folder, "--format", "csv")
    assert code == 0 and len(pd.read_csv(io.StringIO(out))) == 4


def test_predict_takes_a_training_checkpoint(small_search, search_data, capsys):
    checkpoint = next(small_search.glob("*/checkpoint_*/checkpoint.pt"))  # tune-age train's format
    assert load_model(checkpoint).kind == "checkpoint"
    code, out, _ = run(capsys, "predict", checkpoint, search_data.paths[0], "--format", "json")
    assert code == 0 and json.loads(out)[0]["group"] in search_data.groups.names


# --- files that must be refused ------------------------------------------------------------


def test_tampered_exports_are_refused(exported, tmp_path, capsys, search_data):
    state = torch.load(exported, weights_only=True)
    # A contiguous one, whose bytes stand in the file as numpy lays them out (conv weights
    # trained on the CPU are channels_last).
    weight = next(t for t in state["model"].values() if t.numel() >= 64 and t.is_contiguous())
    data = bytearray(exported.read_bytes())
    at = data.find(weight.numpy().tobytes()[:64])
    assert at > 0
    data[at + 3] ^= 0x01  # one bit of one weight
    flipped = tmp_path / "flipped.pt"
    flipped.write_bytes(bytes(data))
    state["metrics"]["val_acc"] = 0.99
    edited = tmp_path / "edited.pt"
    torch.save(state, edited)
    for bad in (flipped, edited):
        with pytest.raises(ArtifactError, match=f"{bad.name}: sha256 mismatch"):
            load_model(bad)
        code, out, err = run(capsys, "predict", bad, search_data.paths[0])
        assert code == 2 and out == "" and "sha256 mismatch" in one_line_error(err)


class CodeInPickle:
    """Unpickling this runs a shell command: exactly what weights_only loading must refuse."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickles_carrying_code_are_refused_and_not_run(tmp_path, capsys, search_data):
    marker = tmp_path / "it-ran"
    as_torch = tmp_path / "model.pt"
    torch.save({"format": "tune_age.results.export", "model": CodeInPickle(marker)}, as_torch)
    as_pickle = tmp_path / "model.pkl"
    as_pickle.write_bytes(pickle.dumps(CodeInPickle(marker)))
    for bad in (as_torch, as_pickle):
        with pytest.raises(ArtifactError, match="refused"):
            load_model(bad)
        code, _, err = run(capsys, "predict", bad, search_data.paths[0])
        line = one_line_error(err)
        assert code == 2 and bad.name in line and "refused" in line and "nothing in this file was run" in line
        code, _, err = run(capsys, "evaluate", bad, "--data", tmp_path)
        assert code == 2 and "refused" in one_line_error(err)
    assert not marker.exists()


def test_files_that_are_not_tune_age_models(tmp_path, exported):
    plain = tmp_path / "weights.pt"
    torch.save({"conv.weight": torch.zeros(3)}, plain)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(ArtifactError, match="not a tune_age export or checkpoint"):
        load_model(plain)
    with pytest.raises(ArtifactError, match="notes.pt: not a tune_age export or checkpoint"):
        load_model(text)
    with pytest.raises(ArtifactError, match="torch.export program"):
        load_model(exported.with_name("best.pt2"))
    with pytest.raises(ArtifactError, match="no such file"):
        load_model(tmp_path / "missing.pt")
    assert issubclass(ArtifactError, TuneAgeError)


def test_bad_options_and_damaged_files_fail_in_one_line(small_search, exported, search_data,
                                                       tmp_path, capsys):
    code, _, err = run(capsys, "report", small_search, "--top", "0", "--out", tmp_path / "report")
    assert code == 2 and "--top 0 is not valid" in one_line_error(err)
    code, _, err = run(capsys, "predict", exported, search_data.paths[0], "--device", "nonsense")
    assert code == 2 and "device 'nonsense' cannot be used here" in one_line_error(err)
    exp = fake_experiment(tmp_path / "exp", {})
    (exp / "rerun.json").write_text("{")
    code, _, err = run(capsys, "report", exp, "--no-eval", "--out", tmp_path / "report")
    assert code == 2 and "rerun.json: not valid JSON" in one_line_error(err)
    (exp / "tune_age.json").write_text("{not json")
    code, _, err = run(capsys, "trials", exp)
    assert code == 2 and "tune_age.json: not valid JSON" in one_line_error(err)


def test_render_rejects_an_unknown_format(small_search):
    exp = load_experiment(small_search)
    with pytest.raises(TuneAgeError, match="format 'xml' is not valid"):
        render(exp, trials_table(exp), "xml")


def test_the_printed_best_configuration_trains_the_same_model(small_search, tmp_path):
    """The summary's `train it again` command, run as printed, retraces the best trial."""
    import shlex

    from tune_age.results import summary_lines

    from conftest import run_cli

    exp = load_experiment(small_search)
    best = exp.best_trial()
    command = next(line for line in summary_lines(exp) if line.startswith("train it again: "))
    args = shlex.split(command.removeprefix("train it again: tune-age "))
    assert f"epochs={exp.meta['max_epochs']}" in args and "--synthetic-n" in args
    proc = run_cli(*args, "--out", str(tmp_path / "again"))
    trained = {int(line.split()[1]): float(line.split("val_acc ")[1].split()[0])
               for line in proc.stdout.splitlines() if line.startswith("epoch ")}
    assert len(trained) == exp.meta["max_epochs"]
    for row in exp.history(best):  # every epoch the trial ran, to the printed four decimals
        assert trained[row["epoch"]] == pytest.approx(row["val_acc"], abs=6e-5), (row["epoch"], trained)
