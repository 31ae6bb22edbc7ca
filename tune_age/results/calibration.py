"""Temperature scaling (Guo et al., 2017): one number that makes the model's probabilities
mean what they say, fitted on the validation split and applied inside every exported form.

    t = fit_temperature(logits, labels)          # minimizes the negative log-likelihood
    expected_calibration_error(softmax(logits / t), labels)

Accuracy does not change (dividing logits by t > 0 keeps their order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ECE_BINS = 15


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, steps: int = 100) -> float:
    """The temperature that minimizes the cross-entropy of logits / t on these labels."""
    logits, labels = logits.detach().float(), labels.long()
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    return float(F.cross_entropy(logits.float() / temperature, labels.long()))


def reliability(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> list[tuple[float, float, int]]:
    """(mean confidence, accuracy, images) of each non-empty equal-width confidence bin:
    the points of a reliability diagram."""
    confidence, pred = probs.max(1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    out = []
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            out.append((float(confidence[inside].mean()), float(correct[inside].mean()), int(inside.sum())))
    return out


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """The gap between confidence and accuracy, averaged over equal-width confidence bins
    weighted by how many images fall in each."""
    points = reliability(probs, labels, bins)
    n = sum(count for _, _, count in points)
    return sum(count / n * abs(conf - acc) for conf, acc, count in points) if n else float("nan")


def calibration_figures(logits: dict[str, tuple[torch.Tensor, torch.Tensor]], fit: bool = True) -> dict:
    """For {split: (logits, labels)}: the temperature fitted on "val" (1.0 when not `fit`) and,
    per split, its size and NLL and ECE before and after: `{split}_n`, `{split}_nll`,
    `{split}_ece` ([before, after])."""
    t = fit_temperature(*logits["val"]) if fit else 1.0
    figures: dict = {"temperature": t}
    for split, (z, y) in logits.items():
        figures[f"{split}_n"] = int(len(y))
        empty = [float("nan")] * 2
        figures[f"{split}_nll"] = [nll(z, y), nll(z, y, t)] if len(y) else empty
        figures[f"{split}_ece"] = ([expected_calibration_error(z.softmax(1), y),
                                    expected_calibration_error((z / t).softmax(1), y)] if len(y) else empty)
    return figures
