"""The main job's stages in order: generate -> prepare -> train -> evaluate -> export."""

from __future__ import annotations

import time

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


def run(cfg) -> dict:
    """Run every stage on ``cfg``; return each stage's result and the seconds it took."""
    init_ray_from(cfg)
    stages = {"prepare": prepare.run, "train": driver.run, "evaluate": evaluate.run, "export": export.run}
    if cfg.data.name == "synthetic":
        stages = {"generate": synthetic.run, **stages}
    if not str(cfg.model._target_).endswith("build_two_tower"):
        del stages["export"]  # only the two-tower model is served (export says why)
    results, seconds = {}, {}
    for name, stage in stages.items():
        started = time.time()
        print(f"== {name}", flush=True)
        results[name] = stage(cfg)
        seconds[name] = round(time.time() - started, 1)
    results["seconds"] = seconds
    print("\n== metrics (test split)\n" + metrics_table(results["evaluate"]), flush=True)
    if "export" in results:
        print(f"\n== exported {results['export']['model_dir']}", flush=True)
    print(f"== seconds per stage {seconds}", flush=True)
    return results
