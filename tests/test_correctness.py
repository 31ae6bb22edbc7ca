"""Results that must not be silently wrong: device placement, the loss with class weights,
duplicates, one preprocessing everywhere, groups too small to evaluate, the best epoch, resume.

Each test fails on the code before its fix (the correctness issue lists them).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tune_age.config import DataConfig, TrainConfig
from tune_age.data import FaceData, load_data
from tune_age.data.decode import decode_one
from tune_age.data.groups import make_groups
from tune_age.data.preprocess import square_resize
from tune_age.errors import DataError
from tune_age.results.export import Packaged, load_model
from tune_age.results.predict import predict
from tune_age.search.tracking import TrialLog
from tune_age.training import checkpoint_state, restore_run, run_epoch, save_atomic, split_tensors, start_run
from tune_age.training import engine
from tune_age.training.selection import best_row, selection_score

GROUPS = make_groups("decades")
TINY = TrainConfig(conv_layers=2, channels=4, fc_layers=2, fc_width=8, image_size=16, batch_size=8,
                   dropout=0.5, epochs=3, device="cpu")


def fake_data(n: int = 60, size: int = 16, seed: int = 0) -> FaceData:
    """Decoded-looking data without files: n images over 3 groups, split 60/20/20."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3 + 2  # groups 20-29, 30-39, 40-49
    order = rng.permutation(n)
    cut1, cut2 = int(n * 0.6), int(n * 0.8)
    return FaceData(
        images={size: rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8)},
        labels=labels.astype(np.int64), ages=(labels * 10 + 5).astype(np.float32),
        paths=[f"/x/{i}.png" for i in range(n)],
        splits={"train": np.sort(order[:cut1]), "val": np.sort(order[cut1:cut2]), "test": np.sort(order[cut2:])},
        groups=GROUPS, mean=[0.5] * 3, std=[0.25] * 3, native_size=size, fingerprint="f" * 64,
        skipped=[], source="fake",
    )


# --- 1. one device for a split's images, labels and ages ---------------------------------


@pytest.mark.parametrize("device", ["cpu", "meta"])  # meta stands in for a GPU: not the CPU
def test_a_split_lives_on_one_device(device):
    tensors = split_tensors(fake_data(), 16, torch.device(device))
    for split in ("train", "val"):
        found = {name: tensors[f"{split}_{name}"].device.type for name in ("x", "y", "age")}
        assert found == dict.fromkeys(("x", "y", "age"), device), found


def test_the_engine_refuses_images_and_labels_on_different_devices():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 10))
    images = torch.zeros(6, 3, 4, 4, dtype=torch.uint8)
    labels = torch.zeros(6, dtype=torch.long, device="meta")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    norm = engine.Normalizer([0.5] * 3, [0.25] * 3, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"images on cpu but labels on meta"):
        engine.train_one_epoch(model, images, labels, opt, torch.nn.CrossEntropyLoss(),
                               batch_size=4, norm=norm)


# --- 2. class weights and label smoothing ---------------------------------------------------


def test_class_weighting_with_smoothing_never_favours_an_empty_group():
    """8 groups of 125 training images and 2 with none: the best constant prediction must be
    a group that exists (the old loss gave the empty groups weight N/C and smoothing mass)."""
    counts = torch.tensor([125] * 8 + [0, 0])
    labels = torch.repeat_interleave(torch.arange(8), 125)
    loss_fn = engine.build_loss(TrainConfig(class_weighting=True, label_smoothing=0.1), counts)
    logits = torch.zeros(10, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        loss_fn(logits.expand(len(labels), 10), labels).backward()
        opt.step()
    p = logits.detach().softmax(0)
    assert p[8:].max() < 0.01 < p[:8].min(), p


def test_class_weights_balance_the_groups_that_exist():
    counts = torch.tensor([300, 100, 0])
    loss_fn = engine.build_loss(TrainConfig(class_weighting=True), counts)
    labels = torch.tensor([0] * 300 + [1] * 100)
    logits = torch.zeros(400, 3, requires_grad=True)
    loss_fn(logits, labels).backward()
    # Each present group pulls with the same total force; the empty group with none of its own.
    pull = -logits.grad[torch.arange(400), labels]
    assert pull[:300].sum().item() == pytest.approx(pull[300:].sum().item(), rel=1e-5)
    unweighted = engine.build_loss(TrainConfig(), counts)
    assert unweighted(torch.zeros(4, 3), torch.tensor([0, 1, 0, 1])).item() == pytest.approx(np.log(3))


# --- 3. duplicates ---------------------------------------------------------------------------


def face_png(path: Path, seed: int, size=(40, 48)) -> Path:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    Image.fromarray(base).resize(size, Image.Resampling.BILINEAR).save(path)
    return path


def write_csv(folder: Path, rows: list[tuple[str, str]]) -> Path:
    csv = folder / "labels.csv"
    csv.write_text("path,age_group\n" + "".join(f"{p},{g}\n" for p, g in rows))
    return csv


def test_duplicates_are_kept_once_and_conflicting_ones_dropped(tmp_path, caplog):
    rows = []
    for i in range(24):
        face_png(tmp_path / f"{i}.png", i)
        rows.append((f"{i}.png", ["20-29", "30-39", "40-49"][i % 3]))
    rows.append(("0.png", "20-29"))  # the same path twice, same label
    (tmp_path / "copy_of_1.png").write_bytes((tmp_path / "1.png").read_bytes())
    rows.append(("copy_of_1.png", "30-39"))  # same bytes, same label: one is kept
    (tmp_path / "copy_of_2.png").write_bytes((tmp_path / "2.png").read_bytes())
    rows.append(("copy_of_2.png", "20-29"))  # same bytes, another label: both dropped
    csv = write_csv(tmp_path, rows)
    with caplog.at_level(logging.WARNING, logger="tune_age.data"):
        data = load_data(DataConfig(path=str(csv), val_fraction=0.2, test_fraction=0.2), [16], progress=False)
    names = sorted(Path(p).name for p in data.paths)
    assert len(names) == len(set(names)) == 23  # 24 faces, less 2.png; one of 1.png and its copy
    assert "2.png" not in names and "copy_of_2.png" not in names
    assert ("1.png" in names) != ("copy_of_1.png" in names)
    reasons = [why for _, why in data.skipped]
    assert sum("duplicate" in r for r in reasons) == 4, reasons
    assert sum("labels disagree" in r for r in reasons) == 2, reasons
    text = caplog.text
    assert "duplicate" in text and "labels disagree" in text


def test_near_duplicates_by_perceptual_hash(tmp_path):
    rows = []
    for i in range(18):
        face_png(tmp_path / f"{i}.png", i)
        rows.append((f"{i}.png", ["20-29", "30-39", "40-49"][i % 3]))
    Image.open(tmp_path / "4.png").save(tmp_path / "4_again.jpg", quality=90)  # re-encoded: new bytes
    rows.append(("4_again.jpg", "30-39"))
    csv = write_csv(tmp_path, rows)
    exact = load_data(DataConfig(path=str(csv)), [16], progress=False)
    assert len(exact.paths) == 19
    near = load_data(DataConfig(path=str(csv), dedupe="near"), [16], progress=False)
    assert len(near.paths) == 18
    assert any("near-duplicate" in why for _, why in near.skipped)


# --- 4. one preprocessing for training, predict and the exported model ----------------------


@pytest.mark.parametrize("square", ["crop", "pad"])
def test_predict_and_the_exported_model_see_the_same_pixels(tmp_path, square):
    photos = [face_png(tmp_path / "wide.png", 1, (71, 40)), face_png(tmp_path / "tall.png", 2, (33, 58))]
    Image.open(photos[0]).save(tmp_path / "wide.jpg", quality=85)
    photos.append(tmp_path / "wide.jpg")
    run = start_run(TINY, fake_data())
    save_atomic(checkpoint_state(run), tmp_path / "model.pt")
    loaded = load_model(tmp_path / "model.pt")
    loaded.square = square
    rows, _ = predict(loaded, photos, top=10)
    packaged = Packaged(loaded.model, loaded.mean, loaded.std, 16, square).eval()
    example = torch.zeros(2, 3, 20, 30, dtype=torch.uint8)  # the program keeps N, H and W dynamic
    dims = {0: torch.export.Dim("n", max=64), 2: torch.export.Dim("h", min=2, max=4096),
            3: torch.export.Dim("w", min=2, max=4096)}
    program = torch.export.export(packaged, (example,), dynamic_shapes={"images": dims}).module()
    # The ONNX export, as `export --onnx` writes it (it checks itself on these images first).
    import onnxruntime

    from tune_age.results.export import _write_onnx

    _write_onnx(loaded, tmp_path / "model.onnx", torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8), {})
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    for photo, row in zip(photos, rows):
        pixels = torch.from_numpy(np.asarray(Image.open(photo).convert("RGB")).copy()).permute(2, 0, 1)[None]
        # The exported preprocessing gives the pixels the decode cache holds...
        assert torch.equal(square_resize(pixels, 16, square).to(torch.uint8)[0],
                           torch.from_numpy(decode_one(str(photo), 16, square)))
        # ...so the probabilities agree with predict's, for uint8 and for float input.
        expected = torch.tensor([t["probability"] for t in sorted(row["top"], key=lambda t: t["group"])])
        names = sorted(loaded.groups.names)
        order = [loaded.groups.names.index(n) for n in names]
        with torch.no_grad():
            onnx_probs = torch.from_numpy(session.run(None, {"images": pixels.numpy()})[0])
            for got in (packaged(pixels), packaged(pixels.float() / 255), program(pixels), onnx_probs):
                assert torch.allclose(got[0, order], expected, atol=1e-5), (photo.name, got, expected)


# --- 5. groups too small to be evaluated ----------------------------------------------------


def test_a_validation_split_of_one_group_is_refused(tmp_path):
    rows = []
    for i in range(7):
        face_png(tmp_path / f"{i}.png", i)
        rows.append((f"{i}.png", "20-29" if i < 5 else "30-39"))
    csv = write_csv(tmp_path, rows)
    with pytest.raises(DataError, match=r"only one age group \(20-29\).*30-39 \(2 images\)"):
        load_data(DataConfig(path=str(csv)), [16], progress=False)


def test_groups_too_small_to_evaluate_are_named(tmp_path, caplog):
    rows = []
    for i in range(14):
        face_png(tmp_path / f"{i}.png", i)
        rows.append((f"{i}.png", "20-29" if i < 6 else "30-39" if i < 12 else "40-49"))
    csv = write_csv(tmp_path, rows)
    with caplog.at_level(logging.WARNING, logger="tune_age.data"):
        data = load_data(DataConfig(path=str(csv)), [16], progress=False)
    assert data.unevaluated == ["40-49"]
    assert "40-49 (2 images)" in caplog.text and "train split only" in caplog.text


# --- 6, 7. one rule for the best epoch ------------------------------------------------------


def test_ties_go_to_the_lower_val_loss_then_the_later_epoch():
    rows = [{"epoch": 1, "val_acc": 0.5, "val_loss": 1.3}, {"epoch": 2, "val_acc": 0.5, "val_loss": 1.2},
            {"epoch": 3, "val_acc": 0.5, "val_loss": 1.2}, {"epoch": 4, "val_acc": 0.4, "val_loss": 0.1},
            {"epoch": 5, "val_acc": 0.9, "diverged": True}]
    assert best_row(rows, "val_acc")["epoch"] == 3
    assert best_row(rows, "val_loss")["epoch"] == 4
    # The loss only separates equal accuracies: one image more on 10 million still wins.
    assert selection_score({"val_acc": 0.5 + 1e-7, "val_loss": 50.0}, "val_acc") > \
        selection_score({"val_acc": 0.5, "val_loss": 0.0}, "val_acc")


class FakeTrial:
    def __init__(self, trial_id: str):
        self.trial_id, self.config, self.local_path, self.error_file = trial_id, {"lr": 0.1}, f"/x/trial_{trial_id}", None


def test_trial_log_best_follows_the_rule_and_forgets_discarded_epochs(tmp_path):
    log = TrialLog(tmp_path, "val_acc", "max", max_epochs=4)
    trial = FakeTrial("t1")
    log.on_trial_start(0, [], trial)
    for epoch, acc, loss in [(1, 0.3, 2.0), (2, 0.5, 1.5), (3, 0.5, 1.4)]:
        log.on_trial_result(0, [], trial, {"epoch": epoch, "val_acc": acc, "val_loss": loss})
    assert (log.trials["t1"]["best"], log.trials["t1"]["best_epoch"]) == (0.5, 3)
    # The driver died after epoch 3 was reported but before its checkpoint was kept: Ray
    # restores epoch 1's checkpoint and the trial reruns epochs 2 and 3 with other results.
    log.on_trial_recover(0, [], trial)
    for epoch, acc, loss in [(2, 0.4, 1.6), (3, 0.45, 1.5)]:
        log.on_trial_result(0, [], trial, {"epoch": epoch, "val_acc": acc, "val_loss": loss})
    assert (log.trials["t1"]["best"], log.trials["t1"]["best_epoch"]) == (0.45, 3)


# --- 8. a resumed run continues exactly ------------------------------------------------------


def test_a_resumed_run_trains_as_if_never_stopped():
    data = fake_data()
    straight = start_run(TINY, data)
    expected = [run_epoch(straight)["train_loss"] for _ in range(3)]

    first = start_run(TINY, data)
    got = [run_epoch(first)["train_loss"]]
    state = checkpoint_state(first)
    torch.manual_seed(1234)  # whatever ran in between in this process
    second = start_run(TINY, data)
    restore_run(second, state)
    got += [run_epoch(second)["train_loss"] for _ in range(2)]
    assert got == expected


@pytest.mark.slow
def test_table_summary_and_export_name_one_best_model(small_search):
    from tune_age.results import load_experiment, summary_lines, trials_table
    from tune_age.results.export import best_checkpoint, best_of, list_checkpoints

    exp = load_experiment(small_search)
    ref, best = best_checkpoint(exp), exp.best_trial()
    assert (ref.trial_id, ref.epoch) == (best["trial_id"], best["best_epoch"])
    assert trials_table(exp).iloc[0]["trial_id"] == best["trial_id"]
    assert f"(trial {best['trial_id']}, epoch {best['best_epoch']})" in summary_lines(exp)[1]
    kept = list_checkpoints(exp)
    for entry in exp.trials.values():  # Ray kept the epoch the rule names, in every trial
        expected = best_row(exp.history(entry), exp.metric)["epoch"]
        assert entry["best_epoch"] == expected
        assert best_of([r for r in kept if r.trial_id == entry["trial_id"]], exp.metric).epoch == expected
