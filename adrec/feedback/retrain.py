"""Incremental retraining with a promotion gate: the champion (the serving version) against a
challenger warm-started from it on the events logged since the champion's data ended.

    compact feedback -> find the impressions newer than the champion's data
    -> prepare the whole log (histories need it; vocabularies grow from the champion's) with a
       fresh split: the new impressions by time into train / validation / holdout (the latest),
       plus a ``retrain.replay`` share of the old log in train against forgetting
    -> train the towers (and the ranker, when the champion was trained with one) from its checkpoints
    -> score challenger and champion on the same fresh holdout, which neither trained on
    -> promote only when the challenger's served score is better by ``retrain.margin``:
       export it (LATEST) and hot-swap Serve (POST /admin/reload) when ``retrain.serve_url`` is set

The champion is scored as it serves: its tables rebuilt at the grown sizes, the rows of users
and ads it never saw copied from its OOV row, and its own shipped calibration. Everything goes
under ``run_dir/retrain/<stamp>/`` and into ``report.json`` there.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
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


def stage_config(cfg, work: Path, model: dict, name: str, calibration: dict | None = None, **trainer):
    """``cfg`` with one model, its own directories under ``work``, trainer overrides and, for a
    model scored as it serves, its fixed calibration."""
    staged = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    with open_dict(staged):
        staged.model = model
        staged.paths.prepared_dir = str(work / "prepared")
        staged.paths.train_dir = str(work / name / "train")
        staged.paths.eval_dir = str(work / name / "eval")
        staged.ranker.enabled = False
        staged.evaluate.calibration = calibration
        for key, value in trainer.items():
            staged.trainer[key] = value
    return staged


def data_end_ms(manifest: dict) -> int:
    """The last event time the champion's data held: what is newer is new to it."""
    ts_range = (manifest["lineage"].get("prepare_report") or {}).get("ts_range_ms")
    if not ts_range:
        raise ValueError(
            f"model version {manifest['version']} does not record its data's time range (exported before "
            "retraining existed, or from a log without timestamps); rerun jobs/pipeline.py to export one that does"
        )
    return int(ts_range[1])


def new_impression_times(events_dir: Path, after_ms: int) -> np.ndarray:
    """(N,) sorted epoch ms of the log's impressions after ``after_ms``."""
    table = ds.dataset(events_dir, format="parquet").to_table(
        columns=["ts"], filter=(ds.field("event") == "impression") & (ds.field("ts") > pa.scalar(after_ms, pa.timestamp("ms", "UTC")))
    )
    return np.sort(pc.cast(table["ts"], pa.int64()).to_numpy(zero_copy_only=False))


def fresh_split(times: np.ndarray, after_ms: int, train: float, validation: float, replay: float) -> dict:
    """``data.prepare.split`` for the new impressions ``times`` (sorted, ms): by count in time order,
    the first ``train`` share trains, the next ``validation`` share validates, the latest rest is the
    holdout; rows up to ``after_ms`` are old, and only a ``replay`` share of them trains."""
    first = np.minimum(len(times) - 1, np.round(np.array([train, train + validation]) * len(times)).astype(np.int64))
    return {"kind": "time", "cutoffs_ms": [int(t) for t in times[first]], "replay_before_ms": after_ms + 1, "replay": replay}


def served_calibration(champion_dir: Path, ranker: bool) -> dict | None:
    """The Platt {a, b} the champion ships for its towers' or its ranker's pCTR."""
    meta = json.loads((champion_dir / "model.json").read_text())
    return (meta.get("ranker") or {}).get("calibration") if ranker else meta.get("calibration")


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


def challenge(cfg, work: Path, model: dict, champion_checkpoint: str, name: str, calibration: dict | None) -> dict:
    """Train a challenger warm-started from the champion, and score both on the fresh holdout."""
    trained = driver.run(stage_config(cfg, work, model, name, resume_from=champion_checkpoint, epochs=int(cfg.retrain.epochs)))
    challenger = evaluate.run(stage_config(cfg, work, model, name))
    served = champion_as_served(champion_checkpoint, model, work / "prepared" / FEATURE_MAP, work / f"{name}_champion" / "checkpoint")
    champion = evaluate_checkpoint(stage_config(cfg, work, model, f"{name}_champion", calibration), served)
    return {"challenger": challenger, "champion": champion, "trained": trained}


def hot_swap(url: str, token_env: str, version: str) -> dict:
    """POST /admin/reload on the live app; its answer (or the error) goes into the report."""
    token = os.environ.get(token_env)
    if not token:
        return {"reloaded": False, "reason": f"no admin token in ${token_env}"}
    answer = httpx.post(f"{url.rstrip('/')}/admin/reload", json={"version": version},
                        headers={"Authorization": f"Bearer {token}"}, timeout=300)
    return {"reloaded": answer.status_code == 200, "status": answer.status_code, "answer": answer.json()}


def run(cfg) -> dict:
    """Retrain from the serving version on the events new to it; promote if better; return the report."""
    init_ray_from(cfg)
    champion_dir = resolve_model_dir(resolve(cfg.retrain.champion or cfg.paths.models_dir))
    manifest = verify_manifest(champion_dir)
    trained_with = manifest["config"]
    work = Path(resolve(cfg.run_dir)) / "retrain" / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    report = {"champion": manifest["version"], "work_dir": str(work), "compaction": compact.run(cfg)}
    seen_until = data_end_ms(manifest)
    new_times = new_impression_times(Path(resolve(cfg.paths.raw_dir)) / "events", seen_until)
    report["new_impressions"] = len(new_times)
    least = int(cfg.retrain.min_new_impressions)
    if len(new_times) < least:
        report["decision"] = {"promote": False, "reason": f"{len(new_times)} impressions are new to the champion; retrain.min_new_impressions is {least}"}
        write_json(work / "report.json", report)
        return report

    r = cfg.retrain
    prepared = fresh_config(cfg, work, champion_dir, new_times, seen_until)
    report["prepare"] = {k: v for k, v in prepare.run(prepared).items() if k in ("splits", "split", "vocabulary_sizes")}

    models = {"towers": challenge(prepared, work, trained_with["model"], manifest["lineage"]["checkpoint"], "towers",
                                  served_calibration(champion_dir, ranker=False))}
    if manifest["lineage"].get("ranker_checkpoint"):  # trained with the champion, shipped or not
        models["ranker"] = challenge(prepared, work, trained_with["ranker"]["model"], manifest["lineage"]["ranker_checkpoint"], "ranker",
                                     served_calibration(champion_dir, ranker=True))
    for name, scored in models.items():
        report[name] = {side: pick(scored[side]) for side in ("challenger", "champion")}
    champion_serves, challenger_serves, report["ranker_choice"] = served_models(champion_dir, models, str(r.ranker_ship))
    report["decision"] = {
        **decide(models[challenger_serves]["challenger"], models[champion_serves]["champion"], str(r.metric), float(r.margin)),
        "challenger_serves": challenger_serves,
        "champion_serves": champion_serves,
    }
    if report["decision"]["promote"]:
        report["exported"] = promote(prepared, work, with_ranker="ranker" in models)
        if r.serve_url:
            report["serve"] = hot_swap(r.serve_url, r.admin_token_env, report["exported"]["version"])
    write_json(work / "report.json", report)
    return report


def fresh_config(cfg, work: Path, champion_dir: Path, new_times: np.ndarray, seen_until: int):
    """``cfg`` preparing into ``work``: vocabularies grown from the champion's, the fresh split."""
    prepared = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    r = cfg.retrain
    with open_dict(prepared):
        prepared.paths.prepared_dir = str(work / "prepared")
        prepared.data.prepare.base_feature_map = str(champion_dir / FEATURE_MAP)
        prepared.data.prepare.split.update(fresh_split(new_times, seen_until, float(r.split.train), float(r.split.validation), float(r.replay)))
    return prepared


def served_models(champion_dir: Path, models: dict, ranker_ship: str) -> tuple[str, str, str | None]:
    """Which model's pCTR each side serves, "towers" or "ranker", and why the challenger's.

    Each side is judged by the pCTR it serves: the champion's shipped model; the challenger's
    the one export will ship (with ``ranker_ship`` auto, the ranker only when it validates
    better than the towers on the new impressions).
    """
    champion = "ranker" if served_calibration(champion_dir, ranker=True) is not None else "towers"
    if "ranker" not in models:
        return champion, "towers", None
    ships, why = export.ships_ranker(models["towers"]["trained"], models["ranker"]["trained"], ranker_ship)
    return champion, "ranker" if ships else "towers", why


LOWER_IS_BETTER = {"logloss", "ece"}


def decide(challenger: dict, champion: dict, metric: str, margin: float) -> dict:
    """Promote only when the challenger's ``metric`` beats the champion's by more than ``margin``
    (``gain`` is the improvement: a drop for logloss and ECE); a metric the holdout cannot give
    (None: e.g. one class only) never promotes."""
    new, old = challenger.get(metric), champion.get(metric)
    gain = None if new is None or old is None else (old - new if metric in LOWER_IS_BETTER else new - old)
    return {"metric": metric, "gain": gain, "margin": margin, "promote": gain is not None and gain > margin}


def pick(metrics: dict) -> dict:
    return {k: metrics.get(k) for k in ("auc", "gauc", "logloss", "ece", "recall@10", "test_examples")}


def promote(cfg, work: Path, with_ranker: bool) -> dict:
    """Export the challenger (towers, and the ranker when retrained: export decides whether it
    ships) as the registry's new LATEST."""
    exported = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    with open_dict(exported):
        exported.paths.train_dir = str(work / "towers" / "train")
        exported.paths.eval_dir = str(work / "towers" / "eval")
        exported.ranker.enabled = with_ranker
        exported.ranker.ship = cfg.retrain.ranker_ship
        exported.ranker.train_dir = str(work / "ranker" / "train")
        exported.ranker.eval_dir = str(work / "ranker" / "eval")
    result = export.run(exported)
    return {key: result[key] for key in ("version", "model_dir", "ranker", "ranker_choice")}
