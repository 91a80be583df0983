"""Model selection: train one two-tower model per user encoder, compare them on the validation
split, and mark the best for evaluation and export.

    python jobs/select_model.py                                  # mlp, cnn, gru, attention
    python jobs/select_model.py 'select.encoders=[mlp,gru]'      # a subset

Each candidate trains into ``<train_dir>/select/<encoder>/``; ``<train_dir>/selection.json``
lists every candidate's best validation metrics and the winner, and the winner's result becomes
``<train_dir>/result.json``, which jobs/evaluate.py and jobs/export.py read.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

from omegaconf import OmegaConf

from adrec.models.components import target_of
from adrec.models.sequence import ENCODERS
from adrec.runtime import read_json, resolve, write_json
from adrec.train import driver


def candidate_config(cfg, encoder: str):
    """``cfg`` with the user encoder of kind ``encoder`` (its class's defaults, as ``model/user_encoder=<encoder>``
    gives) and its own train folder."""
    if encoder not in ENCODERS:
        raise ValueError(f"select.encoders names {encoder!r}; the user encoders are {sorted(ENCODERS)}")
    candidate = copy.deepcopy(cfg)
    OmegaConf.update(candidate, "model.user_encoder", {"_target_": target_of(ENCODERS[encoder])}, merge=False)
    OmegaConf.update(candidate, "paths.train_dir", str(Path(resolve(cfg.paths.train_dir)) / "select" / encoder))
    return candidate


def better(score: float, best: float | None, mode: str) -> bool:
    if score is None or math.isnan(score):
        return False
    return best is None or (score > best if mode == "max" else score < best)


def run(cfg) -> dict:
    """Train every encoder in ``cfg.select.encoders``; return and write ``selection.json``."""
    metric, mode = str(cfg.trainer.select_metric), str(cfg.trainer.select_mode)
    candidates, winner, best = {}, None, None
    for encoder in cfg.select.encoders:
        result = driver.run(candidate_config(cfg, encoder))
        score = result["best"].get(metric)
        candidates[encoder] = {"validation": {k: v for k, v in result["best"].items() if k.startswith("val_")}, "checkpoint": result["best_checkpoint"]}
        if better(score, best, mode):
            winner, best = encoder, score
    if winner is None:
        raise ValueError(f"no candidate reported a usable {metric}; see {cfg.paths.train_dir}/select/")
    train_dir = Path(resolve(cfg.paths.train_dir))
    selection = {"metric": metric, "mode": mode, "winner": winner, "candidates": candidates}
    write_json(train_dir / "selection.json", selection)
    winning = read_json(train_dir / "select" / winner / "result.json")
    write_json(train_dir / "result.json", {**winning, "selected_encoder": winner})
    return selection
