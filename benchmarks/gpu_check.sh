#!/usr/bin/env bash
# The CUDA paths end to end on a real GPU, in about three minutes: one training epoch, a
# 4-trial search packed on one GPU (--gpus-per-trial 0.25), export and predict.
#
#   bash benchmarks/gpu_check.sh            # from the repository root, on a machine with CUDA
#
# Installs tune_age (pip install -e .) unless it imports already, works in a temporary folder
# (or $OUT when set), and exits non-zero at the first step that fails, naming it. Every
# trial must report device "cuda"; the search must have run trials side by side on the GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
work="${OUT:-$(mktemp -d)}"
export TUNE_AGE_CACHE="$work/cache" PYTHONUNBUFFERED=1
step() { echo; echo "== $(date +%H:%M:%S) $*"; }
fail() { echo "GPU CHECK FAILED: $*"; exit 1; }

step "environment"
python -c "import tune_age" 2>/dev/null || python -m pip install -q -e . || fail "pip install -e ."
python - <<'EOF' || fail "no CUDA device visible to torch"
import torch
assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
print("torch", torch.__version__, "CUDA", torch.version.cuda, "device", torch.cuda.get_device_name(0),
      "bf16", torch.cuda.is_bf16_supported())
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true

step "train: one epoch on the GPU (device=auto)"
tune-age train --synthetic-n 600 --out "$work/train" epochs=1 image_size=48 | tee "$work/train.log" \
  || fail "tune-age train"
python - "$work/train/best.pt" <<'EOF' || fail "the training checkpoint"
import sys, torch
state = torch.load(sys.argv[1], weights_only=True, map_location="cpu")
assert state["epoch"] == 1 and state["metrics"]["val_acc"] >= 0, state["metrics"]
print("train checkpoint: epoch", state["epoch"], "val_acc", round(state["metrics"]["val_acc"], 4))
EOF

step "search: 4 trials at --gpus-per-trial 0.25"
tune-age search --synthetic-n 600 --space quick --num-samples 4 --max-epochs 2 --gpus-per-trial 0.25 \
  --storage "$work/results" --name gpu | tee "$work/search.log" || fail "tune-age search"
python - "$work/results/gpu" <<'EOF' || fail "the search's trials"
import json, sys
from pathlib import Path
trials = [json.loads(l) for l in (Path(sys.argv[1]) / "trials.jsonl").read_text().splitlines() if l.strip()]
assert len(trials) == 4, f"{len(trials)} trials"
for t in trials:
    last = t.get("last") or {}
    assert t["status"] in ("completed", "early-stopped"), (t["trial_id"], t["status"], t["errors"])
    assert last.get("device") == "cuda", (t["trial_id"], last.get("device"))
spans = sorted((t["started"], t["ended"]) for t in trials)
overlap = any(b[0] < a[1] for a, b in zip(spans, spans[1:]))
assert overlap, "no two trials ran at the same time: fractional GPUs did not pack"
print("search: 4 trials on cuda, side by side:", ", ".join(f"{t['trial_id']} {t['status']}" for t in trials))
EOF

step "export and predict"
tune-age export "$work/results/gpu" --out "$work/best.pt" --pt2 || fail "tune-age export --pt2"
faces="$work/faces"
tune-age synth "$faces" --n 8 --seed 5 >/dev/null || fail "tune-age synth"
tune-age predict "$work/best.pt" "$faces" --device cuda --format csv | tee "$work/predict.csv" \
  || fail "tune-age predict --device cuda"
rows=$(($(wc -l < "$work/predict.csv") - 1))
[ "$rows" -eq 8 ] || fail "predict gave $rows rows for 8 faces"
python - "$work/best.pt2" <<'EOF' || fail "the .pt2 program on cuda"
import sys, torch
from torch.export.passes import move_to_device_pass
program = move_to_device_pass(torch.export.load(sys.argv[1]), "cuda").module()  # exported on the CPU
probs = program(torch.randint(0, 256, (4, 3, 90, 70), dtype=torch.uint8, device="cuda"))
assert probs.shape[0] == 4 and torch.allclose(probs.sum(1), torch.ones(4, device="cuda"), atol=1e-4), probs
print(".pt2 program on cuda: probabilities of 4 non-square images sum to 1")
EOF

step "GPU CHECK PASSED"
