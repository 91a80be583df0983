"""Model quality against the oracle, baselines and published numbers, on synthetic and real data.

    python benchmarks/quality.py            # 3 seeds each (what the README quotes)
    python benchmarks/quality.py --quick    # 1 seed each, a fast check
    python benchmarks/quality.py --only movielens criteo

Prints JSON with mean and std over seeds:
    synthetic.<encoder>.auc_over_oracle   two-tower AUC / the generator's true-probability AUC (default log size)
    movielens.recall@10, movielens.ndcg@10  implicit feedback, per-user random 80/10/10, full ranking,
                                          items seen in train/validation excluded (+ popularity on the same protocol)
    criteo.auc, criteo.logloss, criteo.lr_auc  the DCN ranker and logistic regression (scikit-learn,
                                          one-hot of the same encoded features) on the same 5 folds
Every stage runs through the jobs' own code (prepare -> Ray Train -> evaluate) in one Ray session;
MovieLens and Criteo run their tuned settings, conf/experiment/{movielens,criteo}.yaml, on the
datasets read in place from ../shared/data (or $ADREC_SHARED_DATA).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

for key, value in {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}.items():
    os.environ.setdefault(key, value)

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from adrec.data import prepare, synthetic  # noqa: E402
from adrec.eval import evaluate  # noqa: E402
from adrec.eval.metrics import auc  # noqa: E402
from adrec.runtime import init_ray  # noqa: E402
from adrec.train import driver  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENCODERS = ("mlp", "cnn", "gru", "attention")
# The tuned settings of each real dataset are its experiment overlay (conf/experiment/), whose data.path
# reads $ADREC_SHARED_DATA: absolute here, so the benchmark runs from any directory. Read in place, never copied.
os.environ.setdefault("ADREC_SHARED_DATA", str(ROOT.parent / "shared" / "data"))


EXTRA: list[str] = []  # --set overrides, applied after each dataset's own


def config(run_dir: Path, overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"run_dir={run_dir}", *overrides, *EXTRA])


def train_and_evaluate(cfg) -> dict:
    driver.run(cfg)
    return evaluate.run(cfg)


def synthetic_runs(seed: int, out: Path) -> dict[str, dict]:
    """Prepare the default synthetic log once, then train and evaluate each encoder on it."""
    base = config(out / f"synthetic-{seed}", [f"seed={seed}"])
    synthetic.run(base)
    prepare.run(base)
    results = {}
    for encoder in ENCODERS:
        cfg = config(
            out / f"synthetic-{seed}",
            [
                f"seed={seed}",
                f"model/user_encoder={encoder}",
                f"paths.train_dir={out}/synthetic-{seed}/train-{encoder}",
                f"paths.eval_dir={out}/synthetic-{seed}/eval-{encoder}",
            ],
        )
        metrics = train_and_evaluate(cfg)
        results[encoder] = {k: metrics[k] for k in ("auc", "oracle_auc", "auc_over_oracle", "gauc", "logloss", "ece", "recall@10")}
    return results


def movielens_run(seed: int, out: Path) -> dict:
    cfg = config(out / f"movielens-{seed}", [f"seed={seed}", "experiment=movielens"])
    prepare.run(cfg)
    metrics = train_and_evaluate(cfg)
    return {k: metrics[k] for k in ("recall@10", "ndcg@10", "hitrate@10", "popularity_recall@10", "popularity_ndcg@10", "retrieval_queries")}


def logistic_regression_auc(prepared: Path) -> float:
    """AUC of L2 logistic regression on one-hot encoded ids (+ dense values), fitted on train + validation."""
    from scipy.sparse import hstack
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import OneHotEncoder

    fit = pd.concat([pq.read_table(prepared / split).to_pandas() for split in ("train", "validation")])
    test = pq.read_table(prepared / "test").to_pandas()
    ids = [c for c in test.columns if c.startswith("C") or c.endswith("_q")]
    dense = [c for c in test.columns if c.startswith("I") and not c.endswith("_q")]
    encoder = OneHotEncoder(handle_unknown="ignore").fit(fit[ids])

    def design(frame):
        return hstack([encoder.transform(frame[ids]), frame[dense].to_numpy()]).tocsr()

    model = LogisticRegression(C=0.1, max_iter=2000).fit(design(fit), fit["label"])
    return auc(test["label"].to_numpy(), model.predict_proba(design(test))[:, 1])


def criteo_runs(seed: int, out: Path, folds: int = 5) -> dict:
    """The DCN ranker and logistic regression on the same ``folds`` cross-validation folds."""
    per_fold = []
    for fold in range(folds):
        folding = [f"data.prepare.split.fold={fold}", f"data.prepare.split.folds={folds}"]
        cfg = config(out / f"criteo-{seed}-{fold}", [f"seed={seed}", "experiment=criteo", *folding])
        prepare.run(cfg)
        metrics = train_and_evaluate(cfg)
        per_fold.append({"auc": metrics["auc"], "logloss": metrics["logloss"], "lr_auc": logistic_regression_auc(Path(cfg.paths.prepared_dir))})
    return {k: float(np.mean([f[k] for f in per_fold])) for k in per_fold[0]}


def summarize(values: list[float]) -> dict:
    return {"mean": round(float(np.mean(values)), 4), "std": round(float(np.std(values)), 4), "n": len(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed of each")
    parser.add_argument("--only", nargs="+", choices=["synthetic", "movielens", "criteo"], default=["synthetic", "movielens", "criteo"])
    parser.add_argument("--out-dir", type=Path, default=Path("/tmp/adrec-bench-quality"))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra config overrides for every run")
    args = parser.parse_args()
    EXTRA.extend(args.set)
    seeds = [0] if args.quick else [0, 1, 2]
    init_ray()
    started = time.time()
    raw: dict[str, list] = {}
    for seed in seeds:
        if "synthetic" in args.only:
            for encoder, metrics in synthetic_runs(seed, args.out_dir).items():
                for key, value in metrics.items():
                    raw.setdefault(f"synthetic.{encoder}.{key}", []).append(value)
        if "movielens" in args.only:
            for key, value in movielens_run(seed, args.out_dir).items():
                raw.setdefault(f"movielens.{key}", []).append(value)
        if "criteo" in args.only:
            for key, value in criteo_runs(seed, args.out_dir).items():
                raw.setdefault(f"criteo.{key}", []).append(value)
    report = {key: summarize([v for v in values if v is not None]) for key, values in sorted(raw.items()) if any(v is not None for v in values)}
    report["seeds"] = seeds
    report["overrides"] = args.set
    report["seconds"] = round(time.time() - started)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
