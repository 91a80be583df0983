"""Export the best checkpoint as a versioned, self-describing model directory (see registry)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pyarrow.parquet as pq
from omegaconf import OmegaConf
from safetensors.torch import save_file

from adrec.inference import embed
from adrec.registry import (
    LATEST,
    MODEL_FORMAT,
    ArtifactError,
    check_same_features,
    load_checkpoint,
    new_version,
    save_ranker,
    save_tower,
    write_manifest,
)
from adrec.results import EvalReport, ModelVersion, PrepareReport, TrainResult
from adrec.runtime import read_json, require, resolve, write_json


def checked_ranker(trained: TrainResult, evaluated: EvalReport, prepared: Path):
    """The DCN ranker of ``trained``, evaluated by ``evaluated``, on ``prepared``'s features."""
    evaluated.check_is_for(trained)
    check_same_features(trained.best_checkpoint, prepared)
    model = load_checkpoint(trained.best_checkpoint)
    if hasattr(model, "user_tower"):
        raise ArtifactError(f"{trained.best_checkpoint} holds a two-tower model, not a ranker: train the ranker with model=dcn")
    return model


SHIP_MODES = ("auto", "always")


def ships_ranker(towers_trained: TrainResult, ranker_trained: TrainResult, mode: str) -> tuple[bool, str]:
    """Whether the ranker's pCTR serves the shortlist, and why. ``auto``: only when its validation
    logloss (the best epoch's, on the same split) beats the towers'; ``always``: whenever trained."""
    if mode not in SHIP_MODES:
        raise ValueError(f"ranker.ship must be one of {SHIP_MODES}, got {mode!r}")
    ranker, towers = ranker_trained.best.get("val_logloss"), towers_trained.best.get("val_logloss")
    if mode == "always":
        return True, "ranker.ship=always"
    if ranker is None or towers is None:
        return False, "no validation logloss to compare (ranker.ship=always ships it anyway)"
    verdict = "below" if ranker < towers else "not below"
    return ranker < towers, f"ranker validation logloss {ranker:.5f} {verdict} the towers' {towers:.5f}"


def export(
    towers: TrainResult,
    towers_eval: EvalReport,
    prepared: Path,
    models_dir: Path,
    config: dict,
    *,
    ranker: tuple[TrainResult, EvalReport] | None = None,
    ship: str = "always",
) -> ModelVersion:
    """Write ``models_dir/<version>/`` from the trained and evaluated towers (and the ranker, when
    given and ``ship`` says it serves), and point ``models_dir/LATEST`` at it.

    ``config`` is the training config, kept in the manifest as the version's lineage.
    """
    try:
        towers_eval.check_is_for(towers)
    except ValueError as failure:
        raise ArtifactError(f"{failure} (run jobs/evaluate.py again before exporting)") from None
    model = load_checkpoint(towers.best_checkpoint)
    if not hasattr(model, "user_tower"):
        raise ArtifactError(
            "export writes a two-tower model for Serve's retrieval; this checkpoint is a ranker "
            "(model=dcn), which is evaluated offline but not served yet. Train model=two_tower to export."
        )
    check_same_features(towers.best_checkpoint, prepared)
    ranker_model, ranker_choice = None, "no ranker trained"
    if ranker is not None:
        candidate = checked_ranker(*ranker, prepared)
        shipped, ranker_choice = ships_ranker(towers, ranker[0], ship)
        ranker_model = candidate if shipped else None

    version = new_version()
    staging = models_dir / f".{version}.partial"  # renamed into place only when complete
    staging.mkdir(parents=True)
    save_tower(model.user_tower, staging, "user_encoder")
    save_tower(model.ad_tower, staging, "ad_encoder")
    catalog = pq.read_table(prepared / "ads.parquet")
    save_file({"embeddings": embed(model.ad_tower, catalog).contiguous()}, staging / "ad_embeddings.safetensors")
    if ranker_model is not None:
        save_ranker(ranker_model, staging)
    for name in ("ads.parquet", "users.parquet", "feature_map.json"):
        shutil.copy2(prepared / name, staging / name)
    towers_eval.save(staging)
    write_json(
        staging / "model.json",
        {
            "format": MODEL_FORMAT,
            "version": version,
            "logit_bias": model.logit_bias.item(),
            "embedding_dim": model.user_tower.width,
            # pCTR = sigmoid(a * (U . V + logit_bias) + b), fitted on the validation split by evaluation.
            "calibration": towers_eval.calibration,
            # The shortlist's pCTR = sigmoid(a * ranker logit + b) when a ranker ships; null: the towers' pCTR.
            "ranker": None if ranker_model is None else {"calibration": ranker[1].calibration, "auc": ranker[1].get("auc")},
        },
    )
    manifest = write_manifest(
        staging,
        format=MODEL_FORMAT,
        version=version,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        config=config,
        lineage={
            "checkpoint": towers.best_checkpoint,
            # Kept when the ranker does not ship, so retraining can challenge it again.
            "ranker_checkpoint": None if ranker is None else ranker[0].best_checkpoint,
            "ranker_choice": ranker_choice,
            "train_run": towers.run_path,
            "prepared_dir": str(prepared),
            "prepare_report": PrepareReport.load(prepared).to_json(),
        },
    )
    final = models_dir / version
    staging.rename(final)
    (models_dir / LATEST).write_text(version + "\n")
    return ModelVersion(version=version, model_dir=str(final), files=manifest["files"], ranker=ranker_model is not None, ranker_choice=ranker_choice)


def trained_ranker(train_dir: Path, eval_dir: Path) -> tuple[TrainResult, EvalReport] | None:
    """The ranker trained into ``train_dir`` and evaluated into ``eval_dir``, or None when none was trained."""
    if not (train_dir / TrainResult.FILE).is_file():
        return None
    evaluated = EvalReport.from_json(read_json(require(eval_dir / EvalReport.FILE, "jobs/evaluate.py for the ranker")))
    return TrainResult.load(train_dir), evaluated


def run(cfg) -> dict:
    """jobs/export.py: the towers of ``paths.train_dir`` / ``paths.eval_dir`` (and the ranker of ``ranker.*``) into ``paths.models_dir``."""
    version = export(
        TrainResult.load(resolve(cfg.paths.train_dir)),
        EvalReport.load(resolve(cfg.paths.eval_dir)),
        Path(resolve(cfg.paths.prepared_dir)),
        Path(resolve(cfg.paths.models_dir)),
        OmegaConf.to_container(cfg, resolve=True),
        ranker=trained_ranker(Path(resolve(cfg.ranker.train_dir)), Path(resolve(cfg.ranker.eval_dir))) if cfg.ranker.enabled else None,
        ship=str(cfg.ranker.get("ship", "always")),
    )
    return version.to_json()
