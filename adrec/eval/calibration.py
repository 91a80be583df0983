"""Platt scaling: pCTR = sigmoid(a * logit + b), fitted on the validation split.

The auction ranks by pCTR x bid and charges by it, so the probability must match observed click
rates, not just order ads well. Negative sampling, the softmax loss and temperature all move a
model's raw logits away from probabilities; two parameters fitted on held-out rows bring them back.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

FORMAT = "adrec.calibration/1"


@dataclass(frozen=True)
class Platt:
    a: float = 1.0
    b: float = 0.0

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """(N,) raw logits -> (N,) calibrated probabilities."""
        return sigmoid(self.a * np.asarray(logits, np.float64) + self.b)

    @classmethod
    def fit(cls, logits: np.ndarray, labels: np.ndarray, iterations: int = 100) -> Platt:
        """Minimise the log loss of sigmoid(a x + b) by Newton's method (a 2x2 system per step).

        Two safeguards from Platt (1999) and Lin et al. (2007), without which a few hundred
        validation rows with wide logits sent ``a`` to 1e10: each step is halved until the loss
        falls, and the targets are smoothed to (N+ + 1) / (N+ + 2) for clicks and 1 / (N- + 2)
        for the rest, so that no fit is perfect and ``a`` stays finite. Needs both classes;
        otherwise returns the identity (the model's own probabilities).
        """
        x, y = np.asarray(logits, np.float64), np.asarray(labels, np.float64)
        if len(x) == 0 or y.min() == y.max():
            return cls()
        clicks = float(np.sum(y > 0.5))
        target = np.where(y > 0.5, (clicks + 1) / (clicks + 2), 1 / (len(y) - clicks + 2))
        a, b = 1.0, 0.0
        loss = smoothed_log_loss(x, target, a, b)
        for _ in range(iterations):
            p = sigmoid(a * x + b)
            w = np.maximum(p * (1 - p), 1e-12)
            gradient = np.array([np.sum((p - target) * x), np.sum(p - target)])
            hessian = np.array([[np.sum(w * x * x), np.sum(w * x)], [np.sum(w * x), np.sum(w)]]) + 1e-9 * np.eye(2)
            step = np.linalg.solve(hessian, gradient)
            scale, trial = 1.0, smoothed_log_loss(x, target, a - step[0], b - step[1])
            while trial > loss and scale > 1e-10:
                scale /= 2
                trial = smoothed_log_loss(x, target, a - scale * step[0], b - scale * step[1])
            if trial > loss:  # no step lowers the loss: at the minimum, up to rounding
                break
            a, b, loss = a - scale * step[0], b - scale * step[1], trial
            if np.abs(scale * step).max() < 1e-10:
                break
        return cls(float(a), float(b))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"format": FORMAT, "method": "platt", **asdict(self)}) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Platt:
        data = json.loads(Path(path).read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"{path} is not an adrec calibration (format {data.get('format')!r})")
        return cls(float(data["a"]), float(data["b"]))


def sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -z))  # no overflow for large |z|


def smoothed_log_loss(x: np.ndarray, target: np.ndarray, a: float, b: float) -> float:
    """Sum of the log loss of sigmoid(a x + b) against soft ``target`` (N,), computed without overflow."""
    z = a * x + b
    return float(np.sum(np.logaddexp(0.0, z) - target * z))
