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
from adrec.runtime import read_json, require, resolve, write_json


def trained_ranker(cfg, prepared: Path) -> dict | None:
    """The evaluated DCN ranker of ``cfg.ranker`` as {model, metrics, checkpoint, trained (its
    result.json)}, or None when none was trained."""
    if not cfg.get("ranker") or not cfg.ranker.enabled:
        return None
    result = Path(resolve(cfg.ranker.train_dir)) / "result.json"
    if not result.is_file():
        return None
    trained = read_json(result)
    metrics = read_json(require(Path(resolve(cfg.ranker.eval_dir)) / "metrics.json", "jobs/evaluate.py for the ranker"))
    if metrics.get("checkpoint") != trained["best_checkpoint"]:
        raise ArtifactError(f"the ranker's metrics in {cfg.ranker.eval_dir} are for another checkpoint: evaluate the ranker again")
    check_same_features(trained["best_checkpoint"], prepared)
    model = load_checkpoint(trained["best_checkpoint"])
    if hasattr(model, "user_tower"):
        raise ArtifactError(f"{cfg.ranker.train_dir} holds a two-tower model, not a ranker: train it with model=dcn")
    return {"model": model, "metrics": metrics, "checkpoint": trained["best_checkpoint"], "trained": trained}


SHIP_MODES = ("auto", "always")


def ships_ranker(towers_trained: dict, ranker_trained: dict, mode: str) -> tuple[bool, str]:
    """Whether the ranker's pCTR serves the shortlist, and why. ``auto``: only when its validation
    logloss (the best epoch's, on the same split) beats the towers'; ``always``: whenever trained."""
    if mode not in SHIP_MODES:
        raise ValueError(f"ranker.ship must be one of {SHIP_MODES}, got {mode!r}")
    ranker, towers = ranker_trained["best"].get("val_logloss"), towers_trained["best"].get("val_logloss")
    if mode == "always":
        return True, "ranker.ship=always"
    if ranker is None or towers is None:
        return False, "no validation logloss to compare (ranker.ship=always ships it anyway)"
    verdict = "below" if ranker < towers else "not below"
    return ranker < towers, f"ranker validation logloss {ranker:.5f} {verdict} the towers' {towers:.5f}"


def run(cfg) -> dict:
    """Write ``models_dir/<version>/`` and point ``models_dir/LATEST`` at it; return its summary."""
    prepared = Path(resolve(cfg.paths.prepared_dir))
    trained = read_json(require(Path(resolve(cfg.paths.train_dir)) / "result.json", "jobs/train.py"))
    metrics = read_json(require(Path(resolve(cfg.paths.eval_dir)) / "metrics.json", "jobs/evaluate.py"))
    if metrics.get("checkpoint") != trained["best_checkpoint"]:
        raise ArtifactError(
            f"the metrics in {cfg.paths.eval_dir} are for {metrics.get('checkpoint')}, not the trained model "
            f"{trained['best_checkpoint']}: run jobs/evaluate.py again before exporting"
        )
    model = load_checkpoint(trained["best_checkpoint"])
    if not hasattr(model, "user_tower"):
        raise ArtifactError(
            "export writes a two-tower model for Serve's retrieval; this checkpoint is a ranker "
            "(model=dcn), which is evaluated offline but not served yet. Train model=two_tower to export."
        )
    check_same_features(trained["best_checkpoint"], prepared)

    root = Path(resolve(cfg.paths.models_dir))
    version = new_version()
    staging = root / f".{version}.partial"  # renamed into place only when complete
    staging.mkdir(parents=True)
    save_tower(model.user_tower, staging, "user_encoder")
    save_tower(model.ad_tower, staging, "ad_encoder")
    catalog = pq.read_table(prepared / "ads.parquet")
    save_file({"embeddings": embed(model.ad_tower, catalog).contiguous()}, staging / "ad_embeddings.safetensors")
    candidate = trained_ranker(cfg, prepared)
    ranker, ranker_choice = None, "no ranker trained"
    if candidate is not None:
        shipped, ranker_choice = ships_ranker(trained, candidate["trained"], str(cfg.ranker.get("ship", "always")))
        ranker = candidate if shipped else None
    if ranker is not None:
        save_ranker(ranker["model"], staging)
    for name in ("ads.parquet", "users.parquet", "feature_map.json"):
        shutil.copy2(prepared / name, staging / name)
    write_json(staging / "metrics.json", metrics)
    write_json(
        staging / "model.json",
        {
            "format": MODEL_FORMAT,
            "version": version,
            "logit_bias": model.logit_bias.item(),
            "embedding_dim": model.user_tower.config["output_dim"],
            # pCTR = sigmoid(a * (U . V + logit_bias) + b), fitted on the validation split by evaluation.
            "calibration": metrics["calibration"],
            # The shortlist's pCTR = sigmoid(a * ranker logit + b) when a ranker ships; null: the towers' pCTR.
            "ranker": None if ranker is None else {"calibration": ranker["metrics"]["calibration"], "auc": ranker["metrics"].get("auc")},
        },
    )
    manifest = write_manifest(
        staging,
        format=MODEL_FORMAT,
        version=version,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        config=OmegaConf.to_container(cfg, resolve=True),
        lineage={
            "checkpoint": trained["best_checkpoint"],
            # Kept when the ranker does not ship, so retraining can challenge it again.
            "ranker_checkpoint": None if candidate is None else candidate["checkpoint"],
            "ranker_choice": ranker_choice,
            "train_run": trained.get("run_path"),
            "prepared_dir": str(prepared),
            "prepare_report": read_json(prepared / "report.json"),
        },
    )
    final = root / version
    staging.rename(final)
    (root / LATEST).write_text(version + "\n")
    return {"version": version, "model_dir": str(final), "files": manifest["files"], "ranker": ranker is not None, "ranker_choice": ranker_choice}
