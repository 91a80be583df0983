"""Incremental retraining with a promotion gate: the champion (the serving version) against a
challenger warm-started from it on the log with its new feedback.

    compact feedback -> prepare (vocabularies grow from the champion's) -> train the towers
    (and the ranker, when the champion ships one) from the champion's checkpoints
    -> evaluate challenger and champion on the same fresh test split
    -> promote only when the challenger's served score is better by ``retrain.margin``:
       export it (LATEST) and hot-swap Serve (POST /admin/reload) when ``retrain.serve_url`` is set

The champion is scored as it serves: its tables rebuilt at the grown sizes, the rows of users
and ads it never saw copied from its OOV row. Everything goes under
``run_dir/retrain/<stamp>/`` and into ``report.json`` there.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import torch
from omegaconf import OmegaConf, open_dict

from adrec import export
from adrec.data import prepare
from adrec.eval import evaluate
from adrec.features import OOV, FeatureMap
from adrec.feedback import compact
from adrec.models import build_model
from adrec.registry import FEATURE_MAP, load_grown, load_training_state, resolve_model_dir, save_checkpoint, verify_manifest
from adrec.runtime import init_ray_from, resolve, write_json
from adrec.train import driver


def stage_config(cfg, work: Path, model: dict, name: str, **trainer):
    """``cfg`` with one model, its own directories under ``work`` and trainer overrides."""
    staged = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    with open_dict(staged):
        staged.model = model
        staged.paths.prepared_dir = str(work / "prepared")
        staged.paths.train_dir = str(work / name / "train")
        staged.paths.eval_dir = str(work / name / "eval")
        staged.ranker.enabled = False
        for key, value in trainer.items():
            staged.trainer[key] = value
    return staged


def champion_as_served(checkpoint: str, model_config: dict, grown_map: Path, out: Path) -> str:
    """The champion's checkpoint rebuilt for the grown feature map, unseen ids on its OOV row."""
    feature_map = FeatureMap.load(grown_map)
    model, _ = build_model(model_config, feature_map)
    weights, _, _ = load_training_state(checkpoint)
    with torch.no_grad():
        for name in load_grown(model, weights):
            table = model.state_dict()[name]
            table[weights[name].shape[0]:] = table[OOV]  # what the champion answers for an id it never saw
    save_checkpoint(model, out, grown_map)
    return str(out)


def evaluate_checkpoint(cfg, checkpoint: str) -> dict:
    """Metrics of ``checkpoint`` on ``cfg``'s prepared test split (through evaluate.run)."""
    write_json(Path(cfg.paths.train_dir) / "result.json", {"best_checkpoint": checkpoint, "epochs": []})
    return evaluate.run(cfg)


def challenge(cfg, work: Path, model: dict, champion_checkpoint: str, name: str) -> dict:
    """Train a challenger warm-started from the champion, and score both on the fresh test split."""
    driver.run(stage_config(cfg, work, model, name, resume_from=champion_checkpoint, epochs=int(cfg.retrain.epochs)))
    challenger = evaluate.run(stage_config(cfg, work, model, name))
    served = champion_as_served(champion_checkpoint, model, work / "prepared" / FEATURE_MAP, work / f"{name}_champion" / "checkpoint")
    champion = evaluate_checkpoint(stage_config(cfg, work, model, f"{name}_champion"), served)
    return {"challenger": challenger, "champion": champion}


def hot_swap(url: str, token_env: str, version: str) -> dict:
    """POST /admin/reload on the live app; its answer (or the error) goes into the report."""
    token = os.environ.get(token_env)
    if not token:
        return {"reloaded": False, "reason": f"no admin token in ${token_env}"}
    answer = httpx.post(f"{url.rstrip('/')}/admin/reload", json={"version": version},
                        headers={"Authorization": f"Bearer {token}"}, timeout=300)
    return {"reloaded": answer.status_code == 200, "status": answer.status_code, "answer": answer.json()}


def run(cfg) -> dict:
    """Retrain from the serving version on the log with its feedback; promote if better; return the report."""
    init_ray_from(cfg)
    champion_dir = resolve_model_dir(resolve(cfg.retrain.champion or cfg.paths.models_dir))
    manifest = verify_manifest(champion_dir)
    trained_with = manifest["config"]
    work = Path(resolve(cfg.run_dir)) / "retrain" / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    report = {"champion": manifest["version"], "work_dir": str(work), "compaction": compact.run(cfg)}

    prepared = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    with open_dict(prepared):
        prepared.paths.prepared_dir = str(work / "prepared")
        prepared.data.prepare.base_feature_map = str(champion_dir / FEATURE_MAP)
    report["prepare"] = {k: v for k, v in prepare.run(prepared).items() if k in ("examples", "vocabulary_sizes")}

    towers = challenge(prepared, work, trained_with["model"], manifest["lineage"]["checkpoint"], "towers")
    report["towers"] = {side: pick(towers[side]) for side in ("challenger", "champion")}
    scorer = towers
    if manifest["lineage"].get("ranker_checkpoint"):  # the ranker's pCTR is what serves: it decides
        ranker = challenge(prepared, work, trained_with["ranker"]["model"], manifest["lineage"]["ranker_checkpoint"], "ranker")
        report["ranker"] = {side: pick(ranker[side]) for side in ("challenger", "champion")}
        scorer = ranker
    report["decision"] = decide(scorer["challenger"], scorer["champion"], str(cfg.retrain.metric), float(cfg.retrain.margin))
    if report["decision"]["promote"]:
        report["exported"] = promote(prepared, work, towers, scorer if scorer is not towers else None)
        if cfg.retrain.serve_url:
            report["serve"] = hot_swap(cfg.retrain.serve_url, cfg.retrain.admin_token_env, report["exported"]["version"])
    write_json(work / "report.json", report)
    return report


def decide(challenger: dict, champion: dict, metric: str, margin: float) -> dict:
    """Promote only when the challenger's ``metric`` beats the champion's by more than ``margin``;
    a metric the holdout cannot give (None: e.g. one class only) never promotes."""
    new, old = challenger.get(metric), champion.get(metric)
    gain = None if new is None or old is None else new - old
    return {"metric": metric, "gain": gain, "margin": margin, "promote": gain is not None and gain > margin}


def pick(metrics: dict) -> dict:
    return {k: metrics.get(k) for k in ("auc", "gauc", "logloss", "ece", "recall@10", "test_examples")}


def promote(cfg, work: Path, towers: dict, ranker: dict | None) -> dict:
    """Export the challenger (towers, and ranker when retrained) as the registry's new LATEST."""
    exported = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    with open_dict(exported):
        exported.paths.train_dir = str(work / "towers" / "train")
        exported.paths.eval_dir = str(work / "towers" / "eval")
        exported.ranker.enabled = ranker is not None
        exported.ranker.train_dir = str(work / "ranker" / "train")
        exported.ranker.eval_dir = str(work / "ranker" / "eval")
    result = export.run(exported)
    return {"version": result["version"], "model_dir": result["model_dir"], "ranker": result["ranker"]}
