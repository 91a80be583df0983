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
        return 1.0 / (1.0 + np.exp(-(self.a * np.asarray(logits, np.float64) + self.b)))

    @classmethod
    def fit(cls, logits: np.ndarray, labels: np.ndarray, iterations: int = 50) -> "Platt":
        """Minimise the log loss of sigmoid(a x + b) by Newton's method (a 2x2 system per step).

        Needs both classes; otherwise returns the identity (the model's own probabilities).
        """
        x, y = np.asarray(logits, np.float64), np.asarray(labels, np.float64)
        if len(x) == 0 or y.min() == y.max():
            return cls()
        a, b = 1.0, 0.0
        for _ in range(iterations):
            p = 1.0 / (1.0 + np.exp(-(a * x + b)))
            w = np.maximum(p * (1 - p), 1e-12)
            gradient = np.array([np.sum((p - y) * x), np.sum(p - y)])
            hessian = np.array([[np.sum(w * x * x), np.sum(w * x)], [np.sum(w * x), np.sum(w)]]) + 1e-9 * np.eye(2)
            step = np.linalg.solve(hessian, gradient)
            a, b = a - step[0], b - step[1]
            if np.abs(step).max() < 1e-10:
                break
        return cls(float(a), float(b))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"format": FORMAT, "method": "platt", **asdict(self)}) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Platt":
        data = json.loads(Path(path).read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"{path} is not an adrec calibration (format {data.get('format')!r})")
        return cls(float(data["a"]), float(data["b"]))
