"""The main job's stages in order: generate -> prepare -> train -> evaluate -> ranker -> export (-> Serve demo)."""

from __future__ import annotations

import time

from omegaconf import OmegaConf, open_dict

from adrec import export
from adrec.data import prepare, synthetic
from adrec.eval import evaluate
from adrec.runtime import init_ray_from
from adrec.train import driver

TABLE_KEYS = (
    "auc", "gauc", "oracle_auc", "popularity_auc", "auc_over_oracle", "logloss", "oracle_logloss",
    "accuracy", "precision", "recall", "ece", "mean_pctr", "observed_ctr",
    "recall@10", "ndcg@10", "hitrate@10", "popularity_recall@10", "popularity_ndcg@10",
)


def metrics_table(metrics: dict) -> str:
    """Two aligned columns of the headline metrics that are present."""
    rows = [(k, metrics[k]) for k in TABLE_KEYS if metrics.get(k) is not None]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v:.4f}" for k, v in rows)


def ranker_config(cfg):
    """``cfg`` with the ranker's model and its own train and eval directories, to train and evaluate it."""
    ranker = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(ranker):
        ranker.model = cfg.ranker.model
        ranker.paths.train_dir = cfg.ranker.train_dir
        ranker.paths.eval_dir = cfg.ranker.eval_dir
    return ranker


def run(cfg) -> dict:
    """Run every stage on ``cfg``; return each stage's result and the seconds it took."""
    init_ray_from(cfg)
    stages = {"prepare": prepare.run, "train": driver.run, "evaluate": evaluate.run, "export": export.run}
    if cfg.data.name == "synthetic":
        stages = {"generate": synthetic.run, **stages}
    if not str(cfg.model._target_).endswith("build_two_tower"):
        del stages["export"]  # only the two-tower model is served (export says why)
    elif cfg.ranker.enabled:
        # Serve re-ranks the towers' shortlist with the DCN ranker, trained on the same examples.
        ranked = ranker_config(cfg)
        stages = {**{k: v for k, v in stages.items() if k != "export"}, "train_ranker": lambda _: driver.run(ranked),
                  "evaluate_ranker": lambda _: evaluate.run(ranked), "export": export.run}
    results, seconds = {}, {}
    for name, stage in stages.items():
        started = time.time()
        print(f"== {name}", flush=True)
        results[name] = stage(cfg)
        seconds[name] = round(time.time() - started, 1)
    results["seconds"] = seconds
    print("\n== metrics (test split)\n" + metrics_table(results["evaluate"]), flush=True)
    if "evaluate_ranker" in results:
        print("\n== the DCN ranker's metrics (test split)\n" + metrics_table(results["evaluate_ranker"]), flush=True)
    if "export" in results:
        print(f"\n== exported {results['export']['model_dir']}", flush=True)
    print(f"== seconds per stage {seconds}", flush=True)
    return results
