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
from dataclasses import dataclass, fields, replace
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import torch
from omegaconf import OmegaConf

from adrec import export
from adrec.data import prepare
from adrec.eval import evaluate
from adrec.features import OOV, FeatureMap
from adrec.feedback import compact
from adrec.models import build_model
from adrec.pipeline import evaluate_options, trainer_options
from adrec.registry import FEATURE_MAP, load_grown, load_training_state, resolve_model_dir, save_checkpoint, verify_manifest
from adrec.results import EvalReport, TrainResult
from adrec.runtime import init_ray_from, resolve, write_json
from adrec.train import driver
from adrec.train.config import TrainerOptions


@dataclass(frozen=True)
class RetrainOptions:
    """The ``retrain`` config group (conf/config.yaml documents each key)."""

    champion: str | None
    epochs: int
    ranker_ship: str
    split: dict
    replay: float
    min_new_impressions: int
    metric: str
    margin: float
    serve_url: str | None
    admin_token_env: str

    @classmethod
    def from_config(cls, section: dict) -> RetrainOptions:
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(section) - set(names))
        missing = sorted(set(names) - set(section))
        if unknown or missing:
            raise ValueError(f"retrain: unknown {unknown}, missing {missing}; the options are {names}")
        return cls(**section)


@dataclass(frozen=True)
class Inputs:
    """What every retraining stage reads: the log's data config, the trainer, evaluation's options."""

    data: dict
    trainer: TrainerOptions
    evaluate: dict
    seed: int


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
            table[weights[name].shape[0] :] = table[OOV]  # what the champion answers for an id it never saw
    save_checkpoint(model, out, grown_map)
    return str(out)


def challenge(
    inputs: Inputs, prepared: Path, work: Path, model: dict, champion_checkpoint: str, name: str, calibration: dict | None, epochs: int
) -> dict:
    """Train a challenger warm-started from the champion, and score both on the fresh holdout."""
    trainer = replace(inputs.trainer, resume_from=champion_checkpoint, epochs=epochs, storage_path=str(work / name / "train"))
    trained = driver.train(prepared, work / name / "train", model, trainer, inputs.seed)
    challenger = evaluate.evaluate(trained, prepared, work / name / "eval", **inputs.evaluate)
    served = champion_as_served(champion_checkpoint, model, prepared / FEATURE_MAP, work / f"{name}_champion" / "checkpoint")
    champion = evaluate.evaluate(
        TrainResult.of_checkpoint(served), prepared, work / f"{name}_champion" / "eval", calibration=calibration, **inputs.evaluate
    )
    return {"challenger": challenger, "champion": champion, "trained": trained}


def hot_swap(url: str, token_env: str, version: str) -> dict:
    """POST /admin/reload on the live app; its answer (or the error) goes into the report."""
    token = os.environ.get(token_env)
    if not token:
        return {"reloaded": False, "reason": f"no admin token in ${token_env}"}
    answer = httpx.post(f"{url.rstrip('/')}/admin/reload", json={"version": version}, headers={"Authorization": f"Bearer {token}"}, timeout=300)
    return {"reloaded": answer.status_code == 200, "status": answer.status_code, "answer": answer.json()}


def run(cfg, serve_url: str | None = None) -> dict:
    """jobs/retrain.py: compact the feedback into the log, then retrain from the serving version;
    ``serve_url`` (else ``retrain.serve_url``): the live app that a promotion hot-swaps."""
    init_ray_from(cfg)
    options = RetrainOptions.from_config(OmegaConf.to_container(cfg.retrain, resolve=True))
    options = replace(options, serve_url=serve_url or options.serve_url)
    compaction = compact.run(cfg)
    inputs = Inputs(OmegaConf.to_container(cfg.data, resolve=True), trainer_options(cfg, cfg.paths.train_dir), evaluate_options(cfg), int(cfg.seed))
    champion_dir = resolve_model_dir(resolve(options.champion or cfg.paths.models_dir))
    work = Path(resolve(cfg.run_dir)) / "retrain" / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    report = retrain(
        champion_dir,
        Path(resolve(cfg.paths.raw_dir)) / "events",
        work,
        Path(resolve(cfg.paths.models_dir)),
        inputs,
        options,
        OmegaConf.to_container(cfg, resolve=True),
    )
    report["compaction"] = compaction
    write_json(work / "report.json", report)
    return report


def retrain(champion_dir: Path, events_dir: Path, work: Path, models_dir: Path, inputs: Inputs, options: RetrainOptions, config: dict) -> dict:
    """Retrain from ``champion_dir`` on the impressions of ``events_dir`` new to it, in ``work``;
    promote into ``models_dir`` if better (``config``: the job's, recorded in the new version's
    manifest); return the report."""
    manifest = verify_manifest(champion_dir)
    trained_with = manifest["config"]
    report = {"champion": manifest["version"], "work_dir": str(work)}
    seen_until = data_end_ms(manifest)
    new_times = new_impression_times(events_dir, seen_until)
    report["new_impressions"] = len(new_times)
    if len(new_times) < options.min_new_impressions:
        report["decision"] = {
            "promote": False,
            "reason": f"{len(new_times)} impressions are new to the champion; retrain.min_new_impressions is {options.min_new_impressions}",
        }
        return report

    prepared = work / "prepared"
    split = fresh_split(new_times, seen_until, float(options.split["train"]), float(options.split["validation"]), options.replay)
    prepared_report = prepare.prepare(inputs.data, prepared, inputs.seed, grow_from=champion_dir / FEATURE_MAP, split=split)
    report["prepare"] = {k: v for k, v in prepared_report.to_json().items() if k in ("splits", "split", "vocabulary_sizes")}

    lineage = manifest["lineage"]
    models = {
        "towers": challenge(
            inputs,
            prepared,
            work,
            trained_with["model"],
            lineage["checkpoint"],
            "towers",
            served_calibration(champion_dir, ranker=False),
            options.epochs,
        )
    }
    if lineage.get("ranker_checkpoint"):  # trained with the champion, shipped or not
        models["ranker"] = challenge(
            inputs,
            prepared,
            work,
            trained_with["ranker"]["model"],
            lineage["ranker_checkpoint"],
            "ranker",
            served_calibration(champion_dir, ranker=True),
            options.epochs,
        )
    for name, scored in models.items():
        report[name] = {side: pick(scored[side]) for side in ("challenger", "champion")}
    champion_serves, challenger_serves, report["ranker_choice"] = served_models(champion_dir, models, options.ranker_ship)
    report["decision"] = {
        **decide(models[challenger_serves]["challenger"], models[champion_serves]["champion"], options.metric, options.margin),
        "challenger_serves": challenger_serves,
        "champion_serves": champion_serves,
    }
    if report["decision"]["promote"]:
        report["exported"] = promote(models, prepared, models_dir, trained_with, config, options.ranker_ship)
        if options.serve_url:
            report["serve"] = hot_swap(options.serve_url, options.admin_token_env, report["exported"]["version"])
    return report


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


def pick(metrics: EvalReport) -> dict:
    return {k: metrics.get(k) for k in ("auc", "gauc", "logloss", "ece", "recall@10", "test_examples")}


def promote(models: dict, prepared: Path, models_dir: Path, trained_with: dict, config: dict, ranker_ship: str) -> dict:
    """Export the challenger (towers, and the ranker when retrained: export decides whether it
    ships) as the registry's new LATEST; its manifest records the models it was trained as."""
    ranker = (models["ranker"]["trained"], models["ranker"]["challenger"]) if "ranker" in models else None
    config = {
        **config,
        "model": trained_with["model"],
        "ranker": {**config.get("ranker", {}), "model": (trained_with.get("ranker") or {}).get("model")},
    }
    towers = models["towers"]
    version = export.export(towers["trained"], towers["challenger"], prepared, models_dir, config, ranker=ranker, ship=ranker_ship)
    return {key: version.to_json()[key] for key in ("version", "model_dir", "ranker", "ranker_choice")}
