"""Two-tower settings on a prepared folder, trained in memory in one process: for sweeps on small logs.

    python jobs/prepare.py experiment=movielens run_dir=/tmp/ml        # once
    python benchmarks/retrieval_loop.py --prepared /tmp/ml/prepared experiment=movielens trainer.lr=0.01

The experiment's model, loss (adrec.train.loop.Objective), optimizer and validation ranking
(adrec.train.ranking.RankingValidation), with the training split as in-memory tensors and a fresh
permutation each epoch instead of Ray Train's stream, so one MovieLens epoch takes ~20 s here
against ~60 s through Ray Train on this 2-core machine. Early stopping and learning-rate decay
follow the composed trainer config on its ``select_metric`` (a ranking metric:
``trainer.validation_ranking_k`` must be set); the best epoch's weights are scored on the test
split by the evaluator's UserRankingTask (seen items excluded). Prints one JSON line per epoch,
then {"overrides", "best_epoch", "val", "test"}.

A settings search here is a scouting tool: what ships is a jobs/tune.py overlay or an experiment
file, measured again through jobs/pipeline.py.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from adrec.eval.evaluate import user_retrieval
from adrec.features import FeatureMap
from adrec.inference import embed, to_features
from adrec.models import build_model
from adrec.train.loop import Objective, Plateau, train_step
from adrec.train.optim import build_optimizer
from adrec.train.ranking import RankingValidation

CONF = Path(__file__).resolve().parents[1] / "conf"


def test_ranking(model, feature_map: FeatureMap, prepared: Path, k: int) -> dict[str, float]:
    """Recall@k and NDCG@k on the test split, by the pipeline's own user protocol (user_retrieval)."""
    catalog = pq.read_table(prepared / "ads.parquet")
    model.eval()
    with torch.no_grad():
        ads = embed(model.ad_tower, catalog).numpy()
        metrics = user_retrieval(model, feature_map, prepared, catalog, ads, np.zeros(len(ads)), [k], limit=None)
    return {f"recall@{k}": metrics[f"recall@{k}"], f"ndcg@{k}": metrics[f"ndcg@{k}"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", type=Path, required=True, help="a folder jobs/prepare.py wrote with the same experiment")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=movielens trainer.lr=0.01")
    args = parser.parse_args()
    if not (args.prepared / "feature_map.json").exists():
        sys.exit(f"{args.prepared} holds no prepared log: run python jobs/prepare.py experiment=<name> run_dir=<dir> first, then pass <dir>/prepared")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=args.overrides)
    trainer = cfg.trainer
    if not trainer.validation_ranking_k:
        sys.exit("benchmarks/retrieval_loop.py selects on a ranking metric: set trainer.validation_ranking_k (experiment=movielens does)")
    torch.manual_seed(int(cfg.seed))
    feature_map = FeatureMap.load(args.prepared / "feature_map.json")
    model, loss = build_model(OmegaConf.to_container(cfg.model, resolve=True), feature_map)
    names = sorted(set(model.user_tower.feature_names) | set(model.ad_tower.feature_names)) + ["label"]
    data = to_features(pq.read_table(args.prepared / "train", columns=names), names)
    rows = len(data["label"])
    optimizer = build_optimizer(model, float(trainer.lr), float(trainer.weight_decay), float(trainer.embedding_l2))
    objective = Objective(loss, feature_map, str(args.prepared / "ads.parquet"), torch.device("cpu"))
    validation = RankingValidation(str(args.prepared), int(trainer.validation_ranking_k), int(trainer.validation_ranking_users), feature_map)
    plateau = Plateau(trainer.select_metric, trainer.select_mode, trainer.early_stopping_patience, trainer.lr_decay_patience)
    best, best_epoch, best_state = None, 0, copy.deepcopy(model.state_dict())
    for epoch in range(1, int(trainer.epochs) + 1):
        started, order, losses = time.perf_counter(), torch.randperm(rows), []
        for start in range(0, rows, int(trainer.batch_size)):
            batch = {name: values[order[start : start + int(trainer.batch_size)]] for name, values in data.items()}
            losses.append(train_step(model, batch, optimizer, objective, contextlib.nullcontext))
        seconds = time.perf_counter() - started
        metrics = {"epoch": epoch, "lr": optimizer.lr, "train_loss": sum(losses) / len(losses), "train_seconds": seconds, **validation(model)}
        print(json.dumps(metrics), flush=True)
        plateau.update(metrics)
        if plateau.since_best == 0:  # this epoch is the best so far
            best, best_epoch, best_state = metrics, epoch, copy.deepcopy(model.state_dict())
        if plateau.should_decay():
            optimizer.scale_lr(trainer.lr_decay_factor)
        if plateau.should_stop():
            break
    model.load_state_dict(best_state)
    test = test_ranking(model, feature_map, args.prepared, int(trainer.validation_ranking_k))
    print(json.dumps({"overrides": args.overrides, "best_epoch": best_epoch, "val": best, "test": test}))


if __name__ == "__main__":
    main()
