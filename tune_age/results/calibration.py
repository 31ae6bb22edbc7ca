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


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """The gap between confidence and accuracy, averaged over equal-width confidence bins
    weighted by how many images fall in each."""
    confidence, pred = probs.max(1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    total = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            total += float(inside.float().mean() * (confidence[inside].mean() - correct[inside].mean()).abs())
    return total
