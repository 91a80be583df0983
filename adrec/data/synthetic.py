"""Synthetic behaviour logs with a planted, known click probability.

Users carry latent interests that their profile attributes partly reveal; ads carry
latent topics that their category partly reveals. An impression is clicked with

    p = sigmoid(base + affinity * <u, a> / sqrt(d) + quality[ad] + slot_effect[slot])

and that ``p`` is stored on the impression row as ``true_pctr``, so evaluation can
report the oracle's AUC: the ceiling no model can pass.

The log is written shard by shard; only the user and ad tables (small next to the
log) are held in memory, so the same code writes 10^4 or 10^8 impressions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from adrec.data import schema

AGE_BUCKETS = ("18-24", "25-34", "35-44", "45-54", "55-64", "65+")
GENDERS = ("f", "m", "u")
REGIONS = tuple(f"r{i}" for i in range(8))
SLOTS = ("top", "side", "feed", "footer")
SLOT_EFFECT = np.array([0.4, 0.0, 0.2, -0.5])
DEVICES = ("mobile", "desktop", "tablet")
START = np.datetime64("2026-01-01T00:00:00", "ms")


@dataclass(frozen=True)
class GeneratorConfig:
    """The log's size and its hidden truth's parameters, documented in conf/data/synthetic.yaml's
    ``generator`` section. The defaults here are that section's values (tests/test_features.py
    checks they agree), for tests that build one directly and configs stored before a field existed."""

    num_impressions: int = 300_000
    num_users: int | None = None  # None: derived from num_impressions
    num_ads: int | None = None
    num_categories: int = 16
    latent_dim: int = 8
    days: int = 28
    base_logit: float = -3.3
    affinity: float = 1.2
    quality_std: float = 0.5
    conversion_rate: float = 0.1
    tokens_per_ad: int = 4
    rows_per_shard: int = 250_000
    seed: int = 7

    def __post_init__(self) -> None:
        if self.num_impressions < 1_000:
            raise ValueError(f"num_impressions must be >= 1000, got {self.num_impressions}")

    @property
    def users(self) -> int:
        # About 200 ad impressions per user over the log: enough to learn a user's interests.
        return self.num_users or max(100, self.num_impressions // 200)

    @property
    def ads(self) -> int:
        return self.num_ads or int(min(100_000, max(100, 2 * math.sqrt(self.num_impressions))))


@dataclass
class World:
    """The hidden truth: latent vectors and effects the log is drawn from."""

    user_latent: np.ndarray  # (U, d)
    user_weight: np.ndarray  # (U,) activity, sums to 1
    ad_latent: np.ndarray  # (A, d)
    ad_quality: np.ndarray  # (A,)
    ad_weight: np.ndarray  # (A,) share of impressions, sums to 1
    users: pa.Table
    ads: pa.Table


def build_world(cfg: GeneratorConfig) -> World:
    """Draw users, ads and their latent structure from ``cfg.seed``."""
    rng = np.random.default_rng(cfg.seed)
    d = cfg.latent_dim
    # Profile attributes shift the latent interest, so features help cold-start users.
    age_vec = rng.normal(0, 0.8, (len(AGE_BUCKETS), d))
    gender_vec = rng.normal(0, 0.5, (len(GENDERS), d))
    region_vec = rng.normal(0, 0.6, (len(REGIONS), d))
    n_users = cfg.users
    age = rng.integers(0, len(AGE_BUCKETS), n_users)
    gender = rng.integers(0, len(GENDERS), n_users)
    region = rng.integers(0, len(REGIONS), n_users)
    user_latent = age_vec[age] + gender_vec[gender] + region_vec[region] + rng.normal(0, 0.8, (n_users, d))
    user_weight = rng.lognormal(0, 0.7, n_users)

    n_ads = cfg.ads
    category_vec = rng.normal(0, 1.0, (cfg.num_categories, d))
    n_advertisers = max(5, n_ads // 10)
    advertiser_category = rng.integers(0, cfg.num_categories, n_advertisers)
    advertiser = rng.integers(0, n_advertisers, n_ads)
    # Most ads are in their advertiser's main category.
    category = np.where(rng.random(n_ads) < 0.8, advertiser_category[advertiser], rng.integers(0, cfg.num_categories, n_ads))
    campaign = advertiser * 3 + rng.integers(0, 3, n_ads)
    ad_latent = category_vec[category] + rng.normal(0, 0.5, (n_ads, d))
    ad_quality = rng.normal(0, cfg.quality_std, n_ads)
    # Exposure skew of the logging policy: some ads are shown far more than others.
    ad_weight = rng.lognormal(0, 0.8, n_ads)

    users = pa.table(
        {
            "user_id": [f"u{i}" for i in range(n_users)],
            "age_bucket": np.asarray(AGE_BUCKETS)[age],
            "gender": np.asarray(GENDERS)[gender],
            "region": np.asarray(REGIONS)[region],
        },
        schema=schema.USERS,
    )
    ads = pa.table(
        {
            "ad_id": [f"a{i}" for i in range(n_ads)],
            "advertiser_id": [f"adv{i}" for i in advertiser],
            "campaign_id": [f"cmp{i}" for i in campaign],
            "category": [f"cat{i}" for i in category],
            "bid": rng.lognormal(0, 0.5, n_ads).astype(np.float32),
            "tokens": _ad_tokens(rng, category, cfg.tokens_per_ad),
        },
        schema=schema.ADS,
    )
    return World(
        user_latent=user_latent,
        user_weight=user_weight / user_weight.sum(),
        ad_latent=ad_latent,
        ad_quality=ad_quality,
        ad_weight=ad_weight / ad_weight.sum(),
        users=users,
        ads=ads,
    )


def _ad_tokens(rng: np.random.Generator, category: np.ndarray, per_ad: int) -> list[list[str]]:
    """Content words: most from the ad's category's own words, one from a shared pool."""
    words = []
    for cat in category:
        own = [f"w{cat}_{j}" for j in rng.integers(0, 12, per_ad - 1)]
        words.append(own + [f"w_any_{rng.integers(0, 40)}"])
    return words


def click_probability(world: World, cfg: GeneratorConfig, users: np.ndarray, ads: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """The true click probability of showing ``ads`` to ``users`` in ``slots``; all (N,)."""
    affinity = np.einsum("nd,nd->n", world.user_latent[users], world.ad_latent[ads]) / math.sqrt(cfg.latent_dim)
    logit = cfg.base_logit + cfg.affinity * affinity + world.ad_quality[ads] + SLOT_EFFECT[slots]
    return 1.0 / (1.0 + np.exp(-logit))


def generate_shard(world: World, cfg: GeneratorConfig, shard: int) -> pa.Table:
    """One time-ordered slice of the log: impressions in [start, end) plus their clicks."""
    rng = np.random.default_rng([cfg.seed, shard])
    first = shard * cfg.rows_per_shard
    n = min(cfg.rows_per_shard, cfg.num_impressions - first)
    span_ms = cfg.days * 86_400_000
    # Time windows proportional to rows, so the log has a uniform event rate.
    lo, hi = span_ms * first // cfg.num_impressions, span_ms * (first + n) // cfg.num_impressions
    offset_ms = np.sort(rng.integers(lo, hi, n))
    users = rng.choice(len(world.user_weight), n, p=world.user_weight)
    ads = rng.choice(len(world.ad_weight), n, p=world.ad_weight)
    slots = rng.integers(0, len(SLOTS), n)
    devices = rng.integers(0, len(DEVICES), n)
    p = click_probability(world, cfg, users, ads, slots)

    impression_ids = np.char.add(f"i{cfg.seed}-", (first + np.arange(n)).astype(str))
    clicked = np.flatnonzero(rng.random(n) < p)
    click_offset = offset_ms[clicked] + 1 + rng.exponential(30_000, len(clicked)).astype(np.int64)
    converted = clicked[rng.random(len(clicked)) < cfg.conversion_rate]
    conv_offset = offset_ms[converted] + 60_000 + rng.exponential(600_000, len(converted)).astype(np.int64)

    rows = np.concatenate([np.arange(n), clicked, converted])
    kind = np.repeat(np.array(schema.EVENT_TYPES), [n, len(clicked), len(converted)])
    event_ids = np.concatenate(
        [
            impression_ids,
            np.char.add("c", impression_ids[clicked]),
            np.char.add("v", impression_ids[converted]),
        ]
    )
    ts = START + np.concatenate([offset_ms, click_offset, conv_offset]).astype("timedelta64[ms]")
    is_impression = kind == "impression"
    order = np.argsort(ts, kind="stable")
    columns = {
        "event_id": event_ids,
        "ts": ts,
        "user_id": np.char.add("u", users[rows].astype(str)),
        "ad_id": np.char.add("a", ads[rows].astype(str)),
        "event": kind,
        "impression_id": pa.array(np.where(is_impression, None, impression_ids[rows]), pa.string()),
        "slot": np.asarray(SLOTS)[slots[rows]],
        "device": np.asarray(DEVICES)[devices[rows]],
        "true_pctr": pa.array(np.where(is_impression, p[rows], np.nan).astype(np.float32), mask=~is_impression),
    }
    table = pa.table({k: pa.array(v) if not isinstance(v, pa.Array) else v for k, v in columns.items()})
    return table.take(pa.array(order)).cast(schema.EVENTS)


def write_logs(cfg: GeneratorConfig, out_dir: str | Path) -> dict:
    """Write ``events/``, ``ads/`` and ``users/`` as Parquet under ``out_dir``; return counts."""
    out = Path(out_dir)
    world = build_world(cfg)
    for name in ("events", "ads", "users"):
        (out / name).mkdir(parents=True, exist_ok=True)
        for stale in (out / name).glob("*.parquet"):
            stale.unlink()
    pq.write_table(world.ads, out / "ads" / "part-00000.parquet")
    pq.write_table(world.users, out / "users" / "part-00000.parquet")
    num_shards = math.ceil(cfg.num_impressions / cfg.rows_per_shard)
    counts = dict.fromkeys(schema.EVENT_TYPES, 0)
    for shard in range(num_shards):
        table = generate_shard(world, cfg, shard)
        pq.write_table(table, out / "events" / f"part-{shard:05d}.parquet")
        for kind, count in zip(*np.unique(table["event"].to_numpy(zero_copy_only=False), return_counts=True), strict=True):
            counts[str(kind)] += int(count)
    return {"users": world.users.num_rows, "ads": world.ads.num_rows, "shards": num_shards, "events": counts}


def run(cfg) -> dict:
    """Write the synthetic log of ``cfg.data.generator`` under ``cfg.paths.raw_dir``."""
    from omegaconf import OmegaConf

    from adrec.runtime import resolve, write_json

    generator = GeneratorConfig(**OmegaConf.to_container(cfg.data.generator, resolve=True))
    out = Path(resolve(cfg.paths.raw_dir))
    summary = write_logs(generator, out)
    write_json(out / "generate.json", {"config": vars(generator), **summary})
    return summary
