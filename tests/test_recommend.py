"""The serving logic without Serve: one process runs features -> towers -> index -> ranker -> auction."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from adrec.ads import AdUpdate, encode_ad
from adrec.auction import FrequencyCap, Marketplace, Shortlist
from adrec.inference import embed
from adrec.recommend import Catalog, LocalRecommender, RankingSide, UserQuery
from adrec.serving_state import ServingState


@pytest.fixture(scope="module")
def local(tiny_run):
    return LocalRecommender(tiny_run["export"]["model_dir"], Marketplace(FrequencyCap(100, 3600)), shortlist=50, popular=10)


def raw_ad(tiny_run, row: int = 0) -> dict:
    return pq.read_table(Path(tiny_run["cfg"].paths.raw_dir) / "ads").slice(row, 1).to_pylist()[0]


def test_the_exported_version_ships_the_dcn_ranker_and_its_calibration(tiny_run):
    side = RankingSide(tiny_run["export"]["model_dir"])
    assert tiny_run["export"]["ranker"] and side.ranker is not None
    assert (side.calibration.a, side.calibration.b) == (
        pytest.approx(tiny_run["evaluate_ranker"]["calibration"]["a"]),
        pytest.approx(tiny_run["evaluate_ranker"]["calibration"]["b"]),
    )


@pytest.mark.parametrize(
    ("ranker", "towers", "mode", "ships"),
    [(0.25, 0.26, "auto", True), (0.27, 0.26, "auto", False), (0.26, 0.26, "auto", False), (0.27, 0.26, "always", True), (None, 0.26, "auto", False)],
)
def test_the_ranker_ships_only_when_it_validates_better_than_the_towers(ranker, towers, mode, ships):
    from adrec.export import ships_ranker
    from adrec.results import TrainResult

    def trained(logloss):
        return TrainResult(best_checkpoint="ckpt", best={"val_logloss": logloss})

    shipped, why = ships_ranker(trained(towers), trained(ranker), mode)
    assert shipped is ships and why
    with pytest.raises(ValueError, match="ranker.ship must be one of"):
        ships_ranker(TrainResult.of_checkpoint("a"), TrainResult.of_checkpoint("b"), "sometimes")


def test_ranker_pctr_depends_on_the_user_and_the_ad(local):
    features = local.features.build([UserQuery("u1"), UserQuery("u2", context={"device": "tablet"})])
    rows = np.arange(5)
    first = local.ranking.pctr({k: v[:1] for k, v in features.items()}, rows, np.zeros(5, np.float32))
    second = local.ranking.pctr({k: v[1:] for k, v in features.items()}, rows, np.zeros(5, np.float32))
    assert first.shape == (5,) and ((first > 0) & (first < 1)).all()
    assert len(set(first.round(6))) > 1 and not np.allclose(first, second)


def test_a_cold_user_gets_popular_ads_added_to_the_shortlist(local):
    cold = local.features.build([UserQuery("nobody-at-all")])
    user = local.users.encode(cold)
    ((plain, _),) = local.retrieval.shortlist(user, 50, [False])
    ((boosted, scores),) = local.retrieval.shortlist(user, 50, [True])
    assert set(plain) < set(boosted) and set(local.retrieval.popular_rows) <= set(boosted)
    assert len(scores) == len(boosted)


def test_local_recommendations_are_ranked_by_ecpm(local):
    result, cold = local.recommend(UserQuery("u3", context={"device": "mobile"}), 10)
    ecpm = [ad.ecpm for ad in result.ads]
    assert len(ecpm) == 10 and ecpm == sorted(ecpm, reverse=True) and cold is False
    assert result.candidates == 50


def test_an_upserted_ad_is_embedded_into_the_index_and_known_to_the_ranker(local, tiny_run):
    ad = raw_ad(tiny_run)
    size = local.retrieval.index.size
    update = AdUpdate("fresh-ad", "fresh-campaign", 1000.0, {k: ad[k] for k in ("advertiser_id", "category", "tokens")})
    local.upsert_ad(update)
    row = local.retrieval.catalog.row_of["fresh-ad"]
    assert row == size == local.ranking.catalog.row_of["fresh-ad"] and local.retrieval.index.size == size + 1
    # Its vector is the ad tower's output for its raw features, encoded as in preparation.
    tower = local.retrieval.ad_tower
    expected = embed(tower, pa.table({n: list(v) if v.ndim == 2 else v for n, v in encode_ad(local.retrieval.feature_map, update).items()}))
    assert np.allclose(local.retrieval.index.vectors[row], expected[0].numpy(), atol=1e-6)
    local.upsert_ad(AdUpdate("fresh-ad", "fresh-campaign", 2.0, update.attributes))  # an update rewrites its row
    assert local.retrieval.index.size == size + 1 and local.ranking.catalog.bids[row] == 2.0


def test_updates_a_version_cannot_encode_are_skipped_alike_by_index_and_ranker(tiny_run):
    local = LocalRecommender(tiny_run["export"]["model_dir"], Marketplace(FrequencyCap(100, 3600)), shortlist=50, popular=10)
    attributes = {k: raw_ad(tiny_run)[k] for k in ("advertiser_id", "category", "tokens")}
    size = local.retrieval.index.size
    log = [
        AdUpdate("good-1", "c", 1.0, attributes),
        AdUpdate("no-inputs", "c", 1.0, {}),
        {"not": "an update"},
        AdUpdate("bad-bid", "c", float("nan"), attributes),
        AdUpdate("good-2", "c", 2.0, attributes),
    ]
    local.retrieval.apply(log)
    local.ranking.apply(log)
    for side in (local.retrieval, local.ranking):
        report = side.updates.report()
        assert report["applied"] == len(log) and report["rejected"] == 3, report
        assert [r["ad_id"] for r in report["latest_rejected"]] == ["no-inputs", "None", "bad-bid"]
        assert "advertiser_id" in report["latest_rejected"][0]["reason"]
        assert (side.catalog.row_of["good-1"], side.catalog.row_of["good-2"], len(side.catalog)) == (size, size + 1, size + 2)
    assert local.retrieval.index.size == size + 2
    assert local.recommend(UserQuery("after-skips"), 5)[0].ads  # and it still serves


def test_a_catalog_write_missing_a_feature_changes_nothing(tiny_run):
    catalog = Catalog(pq.read_table(Path(tiny_run["export"]["model_dir"]) / "ads.parquet"), ["ad_id", "category"])
    before = (list(catalog.ad_ids), catalog.bids.copy(), {n: v.copy() for n, v in catalog.features.items()})
    with pytest.raises(KeyError, match="category"):
        catalog.upsert(AdUpdate("half-ad", "c", 1.0), {"ad_id": np.array([2])})
    assert catalog.ad_ids == before[0] and np.array_equal(catalog.bids, before[1])
    assert all(np.array_equal(catalog.features[n], before[2][n]) for n in before[2]) and "half-ad" not in catalog.row_of


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_version_serves_only_once_every_live_replica_has_loaded_it():
    clock = Clock()
    state = ServingState("/models/v1", live_s=3.0, clock=clock)
    state.poll("enc-1", "user_encoder", ["/models/v1"])
    state.poll("idx-1", "ad_index", ["/models/v1"])
    assert state.begin_rollout("/models/v2")["target"] == "/models/v2"
    state.poll("enc-1", "user_encoder", ["/models/v1", "/models/v2"])
    assert state.view()["serving"] == "/models/v1"  # the index has not loaded it yet
    view = state.poll("idx-1", "ad_index", ["/models/v1", "/models/v2"])
    assert view["serving"] == "/models/v2" and view["previous"] == "/models/v1" and view["target"] is None


def test_a_dead_replica_stops_holding_up_a_rollout_once_silent():
    clock = Clock()
    state = ServingState("/models/v1", live_s=3.0, clock=clock)
    state.poll("dead", "ranker", ["/models/v1"])
    state.begin_rollout("/models/v2")
    clock.now = 1.0
    assert state.poll("alive", "ranker", ["/models/v2"])["serving"] == "/models/v1"
    clock.now = 5.0
    assert state.poll("alive", "ranker", ["/models/v2"])["serving"] == "/models/v2"
    assert state.status()["live_replicas"] == {"ranker": 1}


def test_ad_updates_are_logged_in_order_for_every_replica():
    state = ServingState("/models/v1")
    first = AdUpdate("a", "c", 1.0)
    assert state.add_ad(first) == 1 and state.add_ad(AdUpdate("b", "c", 2.0)) == 2
    assert [u.ad_id for u in state.ads_since(0)] == ["a", "b"] and [u.ad_id for u in state.ads_since(1, 2)] == ["b"]


def test_a_restarted_replica_keeps_the_reloaded_version_but_a_new_config_rolls_out():
    state = ServingState("/models/v1")
    state.begin_rollout("/models/v2")
    state.poll("enc-1", "user_encoder", ["/models/v2"])
    assert state.configure("/models/v1")["serving"] == "/models/v2"  # a restart with the app's original args
    assert state.configure("/models/v3")["target"] == "/models/v3"  # a redeploy naming another version


def test_the_auction_takes_more_of_the_shortlist_until_k_ads_survive():
    n = 100
    shortlist = Shortlist(
        ad_ids=[f"ad{i}" for i in range(n)],
        campaigns=["tablets-only" if i < 60 else "open" for i in range(n)],
        bids=np.ones(n, np.float32),
        pctr=np.linspace(0.9, 0.1, n).astype(np.float32),
        attributes={},
    )
    calls = []

    class CountingMarket(Marketplace):
        def run(self, user_key, request, candidates, k, now=None):
            calls.append(len(candidates))
            return super().run(user_key, request, candidates, k, now)

    market = CountingMarket()
    market.upsert_campaign("tablets-only", targeting={"device": ["tablet"]})
    result = market.run_shortlist("user", {"device": "mobile"}, shortlist, 5)
    assert [ad.ad_id for ad in result.ads] == [f"ad{i}" for i in range(60, 65)]
    assert result.removed["targeting"] == 60 and result.candidates == n
    assert calls == [40, 40]  # the first chunk lost every ad, so a second was sent
