"""The main job's stages in order: generate -> prepare -> train -> evaluate -> ranker -> export (-> Serve demo).

Each stage is a plain call on the previous stages' typed results (adrec.results); only this
adapter reads the config.
"""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import OmegaConf

from adrec import export
from adrec.data import prepare, synthetic
from adrec.eval import evaluate
from adrec.runtime import init_ray_from, resolve
from adrec.train import driver
from adrec.train.config import TrainerOptions

TABLE_KEYS = (
    "auc",
    "gauc",
    "oracle_auc",
    "popularity_auc",
    "auc_over_oracle",
    "logloss",
    "oracle_logloss",
    "accuracy",
    "precision",
    "recall",
    "ece",
    "mean_pctr",
    "observed_ctr",
    "recall@10",
    "ndcg@10",
    "hitrate@10",
    "popularity_recall@10",
    "popularity_ndcg@10",
)


def metrics_table(metrics: dict) -> str:
    """Two aligned columns of the headline metrics that are present."""
    rows = [(k, metrics[k]) for k in TABLE_KEYS if metrics.get(k) is not None]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v:.4f}" for k, v in rows)


def trainer_options(cfg, train_dir: str) -> TrainerOptions:
    """``cfg.trainer`` for a model trained into ``train_dir``: its ``${paths.train_dir}`` settings
    (Ray Train's storage, TensorBoard) follow that folder."""
    section = OmegaConf.merge({"paths": cfg.paths, "trainer": cfg.trainer}, {"paths": {"train_dir": train_dir}})
    return TrainerOptions.from_config(OmegaConf.to_container(section.trainer, resolve=True))


def evaluate_options(cfg) -> dict:
    """The evaluate stage's keyword arguments from ``cfg.evaluate`` and the dataset's protocol."""
    return {
        "ks": list(cfg.evaluate.ks),
        "max_retrieval_queries": int(cfg.evaluate.max_retrieval_queries),
        "protocol": (cfg.data.get("evaluation") or {}).get("protocol", "impression"),
    }


class Stages:
    """Each stage's result (JSON, for the job's output) and the seconds it took."""

    def __init__(self) -> None:
        self.results: dict = {}
        self.seconds: dict = {}

    def run(self, name: str, stage, *args, **kwargs):
        print(f"== {name}", flush=True)
        started = time.time()
        result = stage(*args, **kwargs)
        self.seconds[name] = round(time.time() - started, 1)
        self.results[name] = result.to_json() if hasattr(result, "to_json") else result
        return result


def from_logs(cfg, stages: Stages | None = None) -> dict:
    """prepare -> train -> evaluate (-> the DCN ranker) -> export on ``cfg.data``'s logs."""
    stages = stages or Stages()
    prepared, seed = Path(resolve(cfg.paths.prepared_dir)), int(cfg.seed)
    model = OmegaConf.to_container(cfg.model, resolve=True)
    stages.run("prepare", prepare.prepare, OmegaConf.to_container(cfg.data, resolve=True), prepared, seed)
    towers = stages.run("train", driver.train, prepared, Path(resolve(cfg.paths.train_dir)), model, trainer_options(cfg, cfg.paths.train_dir), seed)
    towers_eval = stages.run("evaluate", evaluate.evaluate, towers, prepared, Path(resolve(cfg.paths.eval_dir)), **evaluate_options(cfg))
    if not str(cfg.model._target_).endswith("build_two_tower"):
        return stages.results  # only the two-tower model is served (export says why)
    ranker = None
    if cfg.ranker.enabled:  # Serve re-ranks the towers' shortlist with the DCN ranker, trained on the same examples
        ranker_model = OmegaConf.to_container(cfg.ranker.model, resolve=True)
        trained = stages.run(
            "train_ranker",
            driver.train,
            prepared,
            Path(resolve(cfg.ranker.train_dir)),
            ranker_model,
            trainer_options(cfg, cfg.ranker.train_dir),
            seed,
        )
        ranker = (
            trained,
            stages.run("evaluate_ranker", evaluate.evaluate, trained, prepared, Path(resolve(cfg.ranker.eval_dir)), **evaluate_options(cfg)),
        )
    stages.run(
        "export",
        export.export,
        towers,
        towers_eval,
        prepared,
        Path(resolve(cfg.paths.models_dir)),
        OmegaConf.to_container(cfg, resolve=True),
        ranker=ranker,
        ship=str(cfg.ranker.ship),
    )
    return stages.results


def run(cfg) -> dict:
    """Run every stage on ``cfg``; return each stage's result and the seconds it took."""
    init_ray_from(cfg)
    stages = Stages()
    if cfg.data.name == "synthetic":
        stages.run("generate", synthetic.run, cfg)
    results = from_logs(cfg, stages)
    results["seconds"] = stages.seconds
    print("\n== metrics (test split)\n" + metrics_table(results["evaluate"]), flush=True)
    if "evaluate_ranker" in results:
        print("\n== the DCN ranker's metrics (test split)\n" + metrics_table(results["evaluate_ranker"]), flush=True)
    if "export" in results:
        print(f"\n== exported {results['export']['model_dir']}", flush=True)
    print(f"== seconds per stage {stages.seconds}", flush=True)
    return results
