"""Model selection: train one two-tower model per user encoder, compare them on the validation
split, and mark the best for evaluation and export.

    python jobs/select_model.py                                  # mlp, cnn, gru, attention
    python jobs/select_model.py 'select.encoders=[mlp,gru]'      # a subset

Each candidate trains into ``<train_dir>/select/<encoder>/``; ``<train_dir>/selection.json``
lists every candidate's best validation metrics and the winner, and the winner's result becomes
``<train_dir>/result.json``, which jobs/evaluate.py and jobs/export.py read.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

from omegaconf import OmegaConf

from adrec.models.components import target_of
from adrec.models.sequence import ENCODERS
from adrec.pipeline import trainer_options
from adrec.results import Selection, TrainResult
from adrec.runtime import init_ray_from, resolve
from adrec.train import driver
from adrec.train.config import TrainerOptions


def candidate_model(model: dict, encoder: str) -> dict:
    """``model`` with the user encoder of kind ``encoder`` and its class's defaults (what
    ``model/user_encoder=<encoder>`` composes: a test keeps the two equal)."""
    if encoder not in ENCODERS:
        raise ValueError(f"select.encoders names {encoder!r}; the user encoders are {sorted(ENCODERS)}")
    options = {k: v for k, v in ENCODERS[encoder]().describe().items() if k != "kind"}
    return {**model, "user_encoder": {"_target_": target_of(ENCODERS[encoder]), **options}}


def better(score: float, best: float | None, mode: str) -> bool:
    if score is None or math.isnan(score):
        return False
    return best is None or (score > best if mode == "max" else score < best)


def select(prepared: Path, train_dir: Path, model: dict, encoders: list[str], trainer: TrainerOptions, seed: int) -> tuple[Selection, TrainResult]:
    """Train ``model`` once per user encoder in ``encoders``, each into ``train_dir/select/<encoder>/``;
    write ``selection.json`` and the winner's ``result.json`` into ``train_dir``; return both."""
    metric, mode = trainer.select_metric, trainer.select_mode
    candidates, results, winner, best = {}, {}, None, None
    for encoder in encoders:
        folder = train_dir / "select" / encoder
        result = driver.train(prepared, folder, candidate_model(model, encoder), replace(trainer, storage_path=str(folder)), seed)
        results[encoder] = result
        candidates[encoder] = {"validation": {k: v for k, v in result.best.items() if k.startswith("val_")}, "checkpoint": result.best_checkpoint}
        if better(result.best.get(metric), best, mode):
            winner, best = encoder, result.best.get(metric)
    if winner is None:
        raise ValueError(f"no candidate reported a usable {metric}; see {train_dir}/select/")
    selection = Selection(metric=metric, mode=mode, winner=winner, candidates=candidates)
    selection.save(train_dir)
    chosen = replace(results[winner], selected_encoder=winner)
    chosen.save(train_dir)  # what jobs/evaluate.py and jobs/export.py read
    return selection, chosen


def run(cfg) -> dict:
    """jobs/select_model.py: every encoder of ``cfg.select.encoders`` on ``paths.prepared_dir``."""
    init_ray_from(cfg)
    selection, _ = select(
        Path(resolve(cfg.paths.prepared_dir)),
        Path(resolve(cfg.paths.train_dir)),
        OmegaConf.to_container(cfg.model, resolve=True),
        list(cfg.select.encoders),
        trainer_options(cfg, cfg.paths.train_dir),
        int(cfg.seed),
    )
    return selection.to_json()
