"""Offline value of model versions' ad policy against the synthetic truth: no Serve, no exploration.

    python benchmarks/policy_value.py                                        # the main job's LATEST
    python benchmarks/policy_value.py runs/synthetic/simulation/<stamp>/models/v*   # each version of a loop run

For each version, ``--views`` page views (users drawn by activity, a random slot and device; the
same draws for every version) go through ``adrec.recommend.LocalRecommender``: the code a Serve
request runs (features, towers, shortlist, calibrated pCTR, eCPM auction), without exploration or
frequency caps. The top ``--k`` ads are scored by their true click probability, against the
oracle (the top k by true pCTR x bid), as jobs/simulate.py scores the live app.

Prints JSON, per version: ctr, oracle_ctr, ctr_over_oracle, revenue_over_oracle, and served_pctr
(the mean pCTR of the ads it picked: above ctr means they were picked for being overestimated).
For versions trained on the synthetic log only: the generator's config is read from each manifest.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from adrec.auction import Marketplace
from adrec.data.synthetic import DEVICES, SLOTS, GeneratorConfig, build_world
from adrec.feedback.simulate import ad_index, draw_views, oracle_choice, policy_scores, truth_matrix
from adrec.recommend import LocalRecommender, UserQuery
from adrec.registry import resolve_model_dir, verify_manifest


def version_value(model_dir: Path, views: int, k: int, seed: int) -> dict:
    manifest = verify_manifest(model_dir)
    generator_config = manifest["config"]["data"].get("generator")
    if not generator_config:
        raise SystemExit(f"{model_dir} was not trained on the synthetic log (its config has no data.generator): there is no truth to score it by")
    generator = GeneratorConfig(**generator_config)
    world = build_world(generator)
    users, slots, devices = draw_views(world, views, np.random.default_rng(seed))
    recommender = LocalRecommender(model_dir, Marketplace(explore=0.0))
    chosen, served = [], []
    for user, slot, device in zip(users, slots, devices):
        result, _ = recommender.recommend(UserQuery(f"u{user}", context={"slot": SLOTS[slot], "device": DEVICES[device]}), k)
        chosen.append([ad_index(ad.ad_id) for ad in result.ads])
        served.append([ad.pctr for ad in result.ads])
    truth, bids = truth_matrix(world, generator, users, slots), world.ads["bid"].to_numpy()
    ctr, revenue = policy_scores(truth, bids, np.array(chosen))
    oracle_ctr, oracle_revenue = policy_scores(truth, bids, oracle_choice(truth, bids, k))
    return {
        "version": manifest["version"],
        "ctr": ctr,
        "oracle_ctr": oracle_ctr,
        "ctr_over_oracle": ctr / oracle_ctr,
        "revenue_over_oracle": revenue / oracle_revenue,
        "served_pctr": float(np.mean(served)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dirs", nargs="*", default=["runs/synthetic/models"], help="version directories or registry roots (their LATEST)")
    parser.add_argument("--views", type=int, default=1000)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    versions = [version_value(resolve_model_dir(path), args.views, args.k, args.seed) for path in args.model_dirs]
    print(json.dumps({"views": args.views, "k": args.k, "seed": args.seed, "versions": versions}, indent=2))


if __name__ == "__main__":
    main()
