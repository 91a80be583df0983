"""adrec beside its peers on the same prepared splits, scored by the same evaluator, on synthetic and real data.

    python benchmarks/quality.py            # 3 seeds each (what the README quotes)
    python benchmarks/quality.py --quick    # 1 seed each, a fast check
    python benchmarks/quality.py --only movielens criteo
    python benchmarks/quality.py --only synthetic --sizes 1 3 --curve-impressions 20000

Prints JSON, one entry per model, every figure {mean, std, n} over seeds:
    movielens.<model>.{recall@10, ndcg@10}  adrec and the ranking peers of benchmarks/peers.py (ease, als,
        bpr, itemknn, mostpop) on adrec's own split of MovieLens 100K: implicit feedback, per-user random
        80/10/10, full ranking over every item, items seen in train/validation excluded, all scored by
        adrec.eval.evaluate.UserRankingTask. Peers fit on train and are tuned on validation, as adrec
        is (--peers-refit: refitted on train + validation; see benchmarks/peers.py); ``params`` lists what each seed chose.
    criteo.<model>.{auc, logloss}  the DCN ranker, logistic regression (lr) and LightGBM on the same 5
        folds of Criteo DAC 8k: per seed the mean over folds; ``auc_by_fold`` is each fold's mean over seeds.
    criteo.paired.<peer>  adrec - peer AUC per fold: ``auc_diff`` over the 5 folds (each fold's difference
        averaged over seeds), ``folds_won`` of ``folds``, and ``pairs_won`` of every (seed, fold) pair.
    synthetic.<encoder>  each of the four user encoders at the default log size (conf/data/synthetic.yaml):
        AUC, the oracle's AUC (the generator's true_pctr) and their ratio; synthetic.reference is the
        well-specified reference (logistic MF of the generator's own form) on the same split.
    avazu.<model>.{auc, logloss}  a second CTR log through configuration alone: the ranker with Criteo's
        settings unchanged (conf/experiment/avazu.yaml), lr and lightgbm on one random split of a generated
        log in Avazu's format (--avazu-rows; adrec.data.avazu_like, not Avazu data); avazu.oracle.auc is the
        planted click probability's AUC over the whole log, the best any model can do.
    synthetic.curve.<m>x  the learning curve: the same users and ads (those of the base log) at m times the
        base log's impressions per user, mlp encoder only (the four encoders at every size would triple
        the run): adrec's, the oracle's and the reference's AUC, and their ratios.
    best_peer.<dataset>  the best peer by the dataset's headline metric beside adrec's value.
Every adrec figure runs through the jobs' own code (prepare -> Ray Train -> evaluate) in one Ray
session; MovieLens and Criteo run their tuned settings, conf/experiment/{movielens,criteo}.yaml, on
the datasets read in place from ../shared/data (or $ADREC_SHARED_DATA); --set overrides every run.
Each seed's figures are kept in <out-dir>/raw.json as soon as they are measured, the report in <out-dir>/quality.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

for key, value in {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}.items():
    os.environ.setdefault(key, value)

import numpy as np  # noqa: E402
import peers  # noqa: E402 (benchmarks/peers.py, beside this script)
from hydra import compose, initialize_config_dir  # noqa: E402

from adrec.data import avazu_like, prepare, synthetic  # noqa: E402
from adrec.eval import evaluate  # noqa: E402
from adrec.eval.metrics import auc  # noqa: E402
from adrec.runtime import init_ray  # noqa: E402
from adrec.train import driver  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENCODERS = ("mlp", "cnn", "gru", "attention")
DATASETS = ("synthetic", "movielens", "criteo", "avazu")
HEADLINE = {"movielens": "recall@10", "criteo": "auc", "synthetic": "auc", "avazu": "auc"}  # what best_peer compares
FOLDS = 5
# The tuned settings of each real dataset are its experiment overlay (conf/experiment/), whose data.path
# reads $ADREC_SHARED_DATA: absolute here, so the benchmark runs from any directory. Read in place, never copied.
os.environ.setdefault("ADREC_SHARED_DATA", str(ROOT.parent / "shared" / "data"))


EXTRA: list[str] = []  # --set overrides, applied after each dataset's own
PEERS_REFIT = [False]  # --peers-refit: the peers refit on train + validation before their test score


def config(run_dir: Path, overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"run_dir={run_dir}", *overrides, *EXTRA])


def train_and_evaluate(cfg) -> dict:
    driver.run(cfg)
    return evaluate.run(cfg)


def missing_input(dataset: str, out: Path) -> str | None:
    """Why ``dataset`` cannot run (its data.path does not exist), or None."""
    if dataset in ("synthetic", "avazu"):
        return None  # generated
    path = Path(config(out, [f"experiment={dataset}"]).data.path)
    if path.exists():
        return None
    return f"{dataset}: its data is read in place from {path} (data.path of conf/experiment/{dataset}.yaml), which does not exist"


# --- A second CTR log: Avazu's format, Criteo's settings ---------------------------------------


def avazu_run(seed: int, out: Path, rows: int) -> dict[str, dict]:
    """The ranker with conf/experiment/criteo.yaml's settings unchanged (experiment=avazu), logistic
    regression and LightGBM on one random split of a generated Avazu-format log (adrec.data.avazu_like),
    and the planted click probability's AUC over the whole log (``oracle``)."""
    table, probability = avazu_like.make_log(rows, seed)
    path = out / f"avazu-{seed}" / "avazu.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    avazu_like.write_csv(table, path)
    cfg = config(out / f"avazu-{seed}", [f"seed={seed}", "experiment=avazu", f"data.path={path}"])
    prepare.run(cfg)
    metrics = train_and_evaluate(cfg)
    results = {"adrec": {k: metrics[k] for k in ("auc", "logloss")}}
    for name, peer in peers.ctr_peers(Path(cfg.paths.prepared_dir), seed, refit=PEERS_REFIT[0]).items():
        results[name] = {k: peer[k] for k in ("auc", "logloss", "params")}
    results["oracle"] = {"auc": auc(table["click"].to_numpy(), probability)}
    return results


# --- Synthetic ----------------------------------------------------------------------------------


def synthetic_metrics(metrics: dict) -> dict:
    return {k: metrics[k] for k in ("auc", "oracle_auc", "auc_over_oracle", "gauc", "logloss", "ece", "recall@10")}


def synthetic_runs(seed: int, out: Path) -> dict[str, dict]:
    """The default synthetic log: each encoder trained and evaluated on it, and the well-specified reference."""
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
        results[encoder] = synthetic_metrics(train_and_evaluate(cfg))
    results["reference"] = peers.well_specified_reference(Path(base.paths.prepared_dir), int(base.data.generator.latent_dim), seed)
    return results


def curve_point(seed: int, out: Path, impressions: int, users: int, ads: int) -> dict:
    """One size of the learning curve: a log of ``impressions`` over the pinned ``users`` and ``ads``
    (same seed, so the same hidden world), the mlp towers and the reference on its split."""
    pinned = [
        f"seed={seed}",
        f"data.generator.num_impressions={impressions}",
        f"data.generator.num_users={users}",
        f"data.generator.num_ads={ads}",
        "model/user_encoder=mlp",
    ]
    cfg = config(out / f"synthetic-curve-{impressions}-{seed}", pinned)
    synthetic.run(cfg)
    prepare.run(cfg)
    towers = train_and_evaluate(cfg)
    reference = peers.well_specified_reference(Path(cfg.paths.prepared_dir), int(cfg.data.generator.latent_dim), seed)
    return {
        "impressions": impressions,
        "impressions_per_user": impressions // users,
        "adrec_auc": towers["auc"],
        "oracle_auc": towers["oracle_auc"],
        "reference_auc": reference["auc"],
        "adrec_over_oracle": towers["auc_over_oracle"],
        "reference_over_oracle": reference["auc"] / towers["oracle_auc"],
        "adrec_over_reference": towers["auc"] / reference["auc"],
        "params": reference["params"],
    }


def curve_runs(seed: int, out: Path, base_impressions: int, multiples: list[int]) -> dict[str, dict]:
    """The learning curve over ``multiples`` of ``base_impressions``; users and ads pinned to the base log's
    (the generator derives both from num_impressions, so only impressions per user grow)."""
    base = synthetic.GeneratorConfig(num_impressions=base_impressions)
    return {f"{m}x": curve_point(seed, out, base_impressions * m, base.users, base.ads) for m in multiples}


# --- MovieLens ----------------------------------------------------------------------------------


def movielens_run(seed: int, out: Path) -> dict[str, dict]:
    """adrec (towers, tuned overlay) and every ranking peer on the same prepared split."""
    cfg = config(out / f"movielens-{seed}", [f"seed={seed}", "experiment=movielens"])
    prepare.run(cfg)
    metrics = train_and_evaluate(cfg)
    results = {"adrec": {k: metrics[k] for k in ("recall@10", "ndcg@10", "hitrate@10", "retrieval_queries")}}
    for name, peer in peers.ranking_peers(Path(cfg.paths.prepared_dir), seed, refit=PEERS_REFIT[0]).items():
        results[name] = {k: peer[k] for k in ("recall@10", "ndcg@10", "hitrate@10", "validation_recall@10", "params")}
    return results


# --- Criteo -------------------------------------------------------------------------------------


def criteo_runs(seed: int, out: Path) -> dict[str, dict]:
    """The DCN ranker, logistic regression and LightGBM on the same ``FOLDS`` folds:
    {model: {"auc": fold mean, "logloss": fold mean, "auc_by_fold": [...], ...}}."""
    per_fold: dict[str, list[dict]] = {}
    for fold in range(FOLDS):
        folding = [f"data.prepare.split.fold={fold}", f"data.prepare.split.folds={FOLDS}"]
        cfg = config(out / f"criteo-{seed}-{fold}", [f"seed={seed}", "experiment=criteo", *folding])
        prepare.run(cfg)
        per_fold.setdefault("adrec", []).append(train_and_evaluate(cfg))
        for name, peer in peers.ctr_peers(Path(cfg.paths.prepared_dir), seed, refit=PEERS_REFIT[0]).items():
            per_fold.setdefault(name, []).append(peer)
    results = {}
    for name, folds in per_fold.items():
        results[name] = {
            "auc": float(np.mean([f["auc"] for f in folds])),
            "logloss": float(np.mean([f["logloss"] for f in folds])),
            "auc_by_fold": [f["auc"] for f in folds],
        }
        if name != "adrec":
            results[name]["params"] = [f["params"] for f in folds]
    return results


def paired(runs: list[dict], peer: str) -> dict:
    """adrec - ``peer`` AUC per fold over seeds' criteo results: the fold differences averaged over
    seeds (mean, std over folds, folds won) and the (seed, fold) pairs won."""
    diffs = np.array([np.subtract(run["adrec"]["auc_by_fold"], run[peer]["auc_by_fold"]) for run in runs])  # (seeds, folds)
    by_fold = diffs.mean(axis=0)
    return {
        "auc_diff": {"mean": round(float(by_fold.mean()), 4), "std": round(float(by_fold.std()), 4)},
        "by_fold": [round(float(d), 4) for d in by_fold],
        "folds_won": int((by_fold > 0).sum()),
        "folds": len(by_fold),
        "pairs_won": int((diffs > 0).sum()),
        "pairs": int(diffs.size),
    }


# --- Summaries ----------------------------------------------------------------------------------


def summarize(values: list[float]) -> dict:
    return {"mean": round(float(np.mean(values)), 4), "std": round(float(np.std(values)), 4), "n": len(values)}


def is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def over_seeds(runs: list):
    """Per-seed results (same nested structure) -> one: numbers {mean, std, n} over the finite ones
    (a constant int stays itself), lists of numbers their per-position mean, ``params`` one per seed."""
    present = [run for run in runs if run is not None]
    if not present:
        return None
    first = present[0]
    if isinstance(first, dict):
        return {key: [run.get(key) for run in runs] if key == "params" else over_seeds([run.get(key) for run in runs]) for key in first}
    if isinstance(first, list) and all(is_number(v) for v in first):
        return [round(float(np.mean(column)), 4) for column in zip(*present)]
    if all(is_number(v) for v in present):
        if isinstance(first, int) and all(v == first for v in runs):
            return first
        finite = [v for v in present if math.isfinite(v)]
        return summarize(finite) if finite else None
    return runs


def best_peer(models: dict[str, dict], metric: str) -> dict:
    """The peer (every model but adrec) with the highest mean ``metric``, beside adrec's."""
    scored = {name: m[metric]["mean"] for name, m in models.items() if name not in ("adrec", "paired", "oracle") and isinstance(m.get(metric), dict)}
    name = max(scored, key=scored.get)
    adrec = ((models.get("adrec") or {}).get(metric) or {}).get("mean")  # None when adrec did not run or had no value
    return {
        "metric": metric,
        "peer": name,
        "peer_value": scored[name],
        "adrec": adrec,
        "adrec_minus_peer": None if adrec is None else round(adrec - scored[name], 4),
    }


def run_dataset(dataset: str, seed: int, args: argparse.Namespace) -> dict:
    if dataset == "movielens":
        return movielens_run(seed, args.out_dir)
    if dataset == "criteo":
        return criteo_runs(seed, args.out_dir)
    if dataset == "avazu":
        return avazu_run(seed, args.out_dir, args.avazu_rows)
    results = synthetic_runs(seed, args.out_dir) if not args.curve_only else {}
    results["curve"] = curve_runs(seed, args.out_dir, args.curve_impressions, args.sizes)
    return results


def report(raw: dict[str, list[dict]]) -> dict:
    """The printed JSON: each dataset over seeds, Criteo's paired differences, the best peer of each."""
    out = {dataset: over_seeds(runs) for dataset, runs in raw.items()}
    if "criteo" in raw:
        out["criteo"]["paired"] = {peer: paired(raw["criteo"], peer) for peer in raw["criteo"][0] if peer != "adrec"}
    best = {}
    for dataset, models in out.items():
        if dataset == "synthetic":
            if "mlp" in models:  # the towers' default encoder against the reference, the one synthetic peer
                best[dataset] = best_peer({"adrec": models["mlp"], "reference": models["reference"]}, HEADLINE[dataset])
        else:
            best[dataset] = best_peer(models, HEADLINE[dataset])
    out["best_peer"] = best
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed of each")
    parser.add_argument("--only", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--out-dir", type=Path, default=Path("/tmp/adrec-bench-quality"))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra config overrides for every run")
    parser.add_argument("--sizes", nargs="+", type=int, default=[1, 3, 10], help="synthetic learning curve: multiples of --curve-impressions")
    parser.add_argument("--curve-impressions", type=int, default=30_000, help="the curve's 1x log (its users and ads stay fixed)")
    parser.add_argument(
        "--peers-refit", action="store_true", help="refit the peers on train + validation before test (more data than adrec trains on)"
    )
    parser.add_argument("--avazu-rows", type=int, default=50_000, help="rows of the generated Avazu-format log")
    parser.add_argument("--curve-only", action="store_true", help="synthetic: the learning curve without the four encoders at the default size")
    args = parser.parse_args()
    EXTRA.extend(args.set)
    PEERS_REFIT[0] = args.peers_refit
    problems = [problem for dataset in args.only if (problem := missing_input(dataset, args.out_dir))]
    if problems:
        hint = (
            f"Set ADREC_SHARED_DATA to the folder holding movielens-100k/ and criteo-dac-8k/ (now {os.environ['ADREC_SHARED_DATA']}; "
            "by default ../shared/data beside the repository), or leave the dataset out with --only."
        )
        sys.exit("benchmarks/quality.py cannot start:\n  " + "\n  ".join(problems) + "\n" + hint)
    seeds = [0] if args.quick else [0, 1, 2]
    init_ray()
    started = time.time()
    raw: dict[str, list[dict]] = {}
    for seed in seeds:
        for dataset in args.only:
            raw.setdefault(dataset, []).append(run_dataset(dataset, seed, args))
            # Each finished run kept on disk, so a later failure does not lose what an hour measured.
            (args.out_dir / "raw.json").write_text(json.dumps(raw, indent=1))
    result = {**report(raw), "seeds": seeds, "overrides": args.set, "peers_refit": args.peers_refit, "seconds": round(time.time() - started)}
    # Ray forwards the train workers' progress lines to this stdout too: the file holds the JSON alone.
    (args.out_dir / "quality.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
