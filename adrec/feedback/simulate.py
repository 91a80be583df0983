"""A closed-loop simulation: a live Serve app, users with the synthetic generator's hidden truth.

Each round, ``simulate.views_per_round`` page views (users drawn by their activity, a random
slot and device) ask the app for ``k`` ads over HTTP; each shown ad is clicked with its true
probability; impressions and clicks are posted to /feedback with their tokens; then
jobs/retrain.py's ``run`` compacts, retrains from the serving version on the new impressions and,
when the challenger wins on the latest of them, hot-swaps the app.

Per round it reports the online CTR and revenue (bids of clicked ads) of the served ads, scored
by their expected clicks, against three policies on the same page views: random ads, the
most-clicked ads of the log, and the oracle: the app's own objective (the top k by pCTR x bid)
with the true probabilities in place of the model's. ``max_ctr`` is the top k by true
probability alone, the ceiling for CTR that no revenue-ranked policy aims at.

The app is reached only over HTTP, at the URL it is given: jobs/simulate.py starts it on the
loop's copy of the model registry (``loop_config``) with serve/launch.py, and stops it after.
"""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from omegaconf import OmegaConf, open_dict

from adrec.data.synthetic import DEVICES, SLOTS, GeneratorConfig, build_world, click_probability
from adrec.feedback import retrain
from adrec.runtime import init_ray_from, require, resolve, write_json


def policy_scores(truth: np.ndarray, bids: np.ndarray, chosen: np.ndarray) -> tuple[float, float]:
    """(expected CTR, expected revenue per view) of ``chosen`` (V, k) ad indices; truth (V, A)."""
    p = np.take_along_axis(truth, chosen, 1)
    return float(p.mean()), float((p * bids[chosen]).sum(1).mean())


def oracle_choice(truth: np.ndarray, bids: np.ndarray, k: int) -> np.ndarray:
    """(V, k) ad indices: the auction's eCPM order with the true pCTR ``truth`` (V, A) in place of the model's."""
    return np.argsort(-(truth * bids), axis=1)[:, :k]


def baselines(truth: np.ndarray, bids: np.ndarray, popular: np.ndarray, k: int, rng: np.random.Generator) -> dict:
    """(expected CTR, revenue per view) of each reference policy on the views of ``truth`` (V, A)."""
    views, ads = truth.shape
    random_ads = np.stack([rng.choice(ads, k, replace=False) for _ in range(views)])
    return {
        "random": policy_scores(truth, bids, random_ads),
        "popularity": policy_scores(truth, bids, np.tile(popular[:k], (views, 1))),
        "oracle": policy_scores(truth, bids, oracle_choice(truth, bids, k)),
        "max_ctr": policy_scores(truth, bids, np.argsort(-truth, axis=1)[:, :k]),
    }


def draw_views(world, views: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Page views as the log has them: users (V,) drawn by activity, slots (V,) and devices (V,) uniform."""
    users = rng.choice(len(world.user_weight), views, p=world.user_weight)
    return users, rng.integers(len(SLOTS), size=views), rng.integers(len(DEVICES), size=views)


def truth_matrix(world, generator: GeneratorConfig, users: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """(V, A) true click probability of every ad in each page view of ``users`` (V,) in ``slots`` (V,)."""
    ads = np.arange(len(world.ad_weight))
    return click_probability(world, generator, np.repeat(users, len(ads)), np.tile(ads, len(users)), np.repeat(slots, len(ads))).reshape(
        len(users), len(ads)
    )


def ad_rows(world) -> dict[str, int]:
    """{ad id: the world's row of that ad}: how served ads are looked up in the truth."""
    return {ad_id: row for row, ad_id in enumerate(world.ads["ad_id"].to_pylist())}


def popular_ads(raw_dir: Path, rows: dict[str, int]) -> np.ndarray:
    """The world's ad rows by clicks in the log, most first (ads the world does not know are left out)."""
    events = pq.read_table(raw_dir / "events", columns=["ad_id", "event"])
    clicked = events.filter(pc.equal(events["event"], "click"))["ad_id"].to_pylist()
    counts = np.bincount([rows[a] for a in clicked if a in rows], minlength=len(rows))
    return np.argsort(-counts, kind="stable")


PRINTED = ("ctr", "oracle_ctr", "ctr_over_oracle", "served_pctr", "max_ctr", "popularity_ctr", "random_ctr")


class App:
    """The Serve app under simulation, reached over HTTP."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx.Client(timeout=60, limits=httpx.Limits(max_connections=16))

    def recommend(self, view: dict) -> dict:
        answer = self.http.post(f"{self.url}/recommend", json=view)
        answer.raise_for_status()
        return answer.json()

    def feedback(self, events: list[dict]) -> None:
        for start in range(0, len(events), 100):
            self.http.post(f"{self.url}/feedback", json={"events": events[start : start + 100]}).raise_for_status()


def play_round(app: App, world, generator: GeneratorConfig, views: int, k: int, rng: np.random.Generator, round_: int, rows: dict[str, int]) -> dict:
    """Serve ``views`` page views, draw clicks from the truth, post them back; the served ads and clicks."""
    users, slots, devices = draw_views(world, views, rng)
    bodies = [{"user_id": f"u{u}", "k": k, "context": {"slot": SLOTS[s], "device": DEVICES[d]}} for u, s, d in zip(users, slots, devices)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(app.recommend, bodies))
    chosen = np.array([[rows[ad["ad_id"]] for ad in answer["ads"]] for answer in answers])  # (V, k)
    served_pctr = np.array([[ad["pctr"] for ad in answer["ads"]] for answer in answers])  # (V, k)
    p = click_probability(world, generator, np.repeat(users, k), chosen.ravel(), np.repeat(slots, k)).reshape(views, k)
    clicks = rng.random(p.shape) < p
    events = []
    for v, answer in enumerate(answers):
        for j, ad in enumerate(answer["ads"]):
            base = {"user_id": answer["user_id"], "token": ad["token"]}
            events.append({**base, "event_id": f"r{round_}-v{v}-{j}-imp", "event": "impression"})
            if clicks[v, j]:
                events.append({**base, "event_id": f"r{round_}-v{v}-{j}-click", "event": "click"})
    app.feedback(events)
    return {
        "users": users,
        "slots": slots,
        "chosen": chosen,
        "served_pctr": served_pctr,
        "clicks": clicks,
        "versions": {a["model_version"] for a in answers},
    }


def round_report(round_: int, played: dict, world, generator: GeneratorConfig, popular: np.ndarray, k: int, rng) -> dict:
    bids = world.ads["bid"].to_numpy()
    truth = truth_matrix(world, generator, played["users"], played["slots"])
    ours_ctr, ours_revenue = policy_scores(truth, bids, played["chosen"])
    other = baselines(truth, bids, popular, k, rng)
    return {
        "round": round_,
        "model_versions": sorted(played["versions"]),
        "ctr": ours_ctr,
        "observed_ctr": float(played["clicks"].mean()),
        "served_pctr": float(played["served_pctr"].mean()),  # the model's belief about the same ads: calibration online
        "revenue_per_view": ours_revenue,
        "observed_revenue": float((played["clicks"] * bids[played["chosen"]]).sum()),
        "oracle_ctr": other["oracle"][0],
        "random_ctr": other["random"][0],
        "popularity_ctr": other["popularity"][0],
        "oracle_revenue_per_view": other["oracle"][1],
        "random_revenue_per_view": other["random"][1],
        "popularity_revenue_per_view": other["popularity"][1],
        "max_ctr": other["max_ctr"][0],
        "ctr_over_oracle": ours_ctr / other["oracle"][0],
        "revenue_over_oracle": ours_revenue / other["oracle"][1],
    }


def plot(rounds: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["round"] for r in rounds]
    fig, (ctr, revenue) = plt.subplots(1, 2, figsize=(12, 3.8))
    # One colour per policy in both panels; revenue has no max-CTR line.
    policies = [
        ("", "adrec (served)", "C0"),
        ("oracle_", "oracle (eCPM order, true pCTR)", "C1"),
        ("max_", "top k by true pCTR", "C2"),
        ("popularity_", "popularity", "C3"),
        ("random_", "random", "C4"),
    ]
    for prefix, label, colour in policies:
        ctr.plot(x, [r[f"{prefix}ctr"] for r in rounds], marker="o", label=label, color=colour)
        if prefix != "max_":
            revenue.plot(x, [r[f"{prefix}revenue_per_view"] for r in rounds], marker="o", label=label, color=colour)
    ctr.set(xlabel="round", ylabel="expected CTR", title="Online CTR", xticks=x)
    revenue.set(xlabel="round", ylabel="expected revenue per view", title="Revenue (bids of clicked ads)", xticks=x)
    fig.tight_layout(rect=(0, 0, 0.78, 1))
    fig.legend(*ctr.get_legend_handles_labels(), loc="center right", fontsize="small")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def loop_config(cfg):
    """``cfg`` moved to its own run folder, ``<run_dir>/simulation/<stamp>/``, with a copy of the
    log and the model registry: the loop appends feedback to its log and promotes versions,
    leaving the main run as it was. A whole config, because between rounds the loop runs the
    retrain job on that folder as jobs/retrain.py would."""
    directory = Path(resolve(cfg.run_dir)) / "simulation" / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    looped = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(looped):
        looped.run_dir = str(directory)
    looped = OmegaConf.create(OmegaConf.to_container(looped, resolve=True))
    for name in ("raw_dir", "models_dir"):
        shutil.copytree(require(resolve(cfg.paths[name]), "jobs/pipeline.py"), looped.paths[name])
    return looped


def run(cfg, app_url: str, report_dir: Path) -> dict:
    """Play ``simulate.rounds`` rounds against the app at ``app_url``, which serves
    ``cfg.paths.models_dir`` and logs feedback to ``cfg.paths.feedback_dir`` (``cfg`` from
    ``loop_config``); retrain between rounds, hot-swapping the app on promotion (the admin token
    in ``$retrain.admin_token_env``). Writes simulate.json and simulate.png into ``report_dir``."""
    init_ray_from(cfg)
    generator = GeneratorConfig(**OmegaConf.to_container(cfg.data.generator, resolve=True))
    world = build_world(generator)  # the same seed as the log: the users the model learned
    rows = ad_rows(world)
    popular = popular_ads(Path(resolve(cfg.paths.raw_dir)), rows)
    k, rng = int(cfg.simulate.k), np.random.default_rng(int(cfg.seed))
    app = App(app_url)
    rounds, retrains = [], []
    for round_ in range(1, int(cfg.simulate.rounds) + 1):
        started = time.time()
        played = play_round(app, world, generator, int(cfg.simulate.views_per_round), k, rng, round_, rows)
        rounds.append(round_report(round_, played, world, generator, popular, k, rng))
        print(f"== round {round_}: {json.dumps({key: rounds[-1][key] for key in PRINTED})}", flush=True)
        if round_ < int(cfg.simulate.rounds):
            report = retrain.run(cfg, serve_url=app_url)
            retrains.append(
                {"round": round_, **{key: report.get(key) for key in ("new_impressions", "decision", "towers", "ranker", "exported", "serve")}}
            )
        rounds[-1]["seconds"] = round(time.time() - started, 1)
    result = {
        "rounds": rounds,
        "retrains": retrains,
        "final_ctr_over_oracle": rounds[-1]["ctr_over_oracle"],
        "views_per_round": int(cfg.simulate.views_per_round),
        "k": k,
        "explore": float(cfg.simulate.explore),
    }
    plot(rounds, Path(report_dir) / "simulate.png")
    write_json(Path(report_dir) / "simulate.json", result)
    return result
