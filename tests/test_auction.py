import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import ray

from adrec.auction import RULES, Candidate, FrequencyCap, Marketplace


def ad(ad_id: str, campaign: str = "c1", bid: float = 1.0, pctr: float = 0.1, **attributes: str) -> Candidate:
    return Candidate(ad_id=ad_id, campaign_id=campaign, bid=bid, pctr=pctr, attributes=attributes)


def shown(result) -> list[str]:
    return [winner.ad_id for winner in result.ads]


# --- ranking ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("low_bid_pctr", "high_bid_wins"),
    [(0.04, True), (0.06, False)],  # against the high-bid ad's pctr * bid = 0.01 * 5 = 0.05
)
def test_ecpm_decides_between_a_high_bid_and_a_high_pctr(low_bid_pctr, high_bid_wins):
    high_bid, low_bid = ad("high-bid", bid=5.0, pctr=0.01), ad("high-pctr", bid=1.0, pctr=low_bid_pctr)
    result = Marketplace().run("u", {}, [low_bid, high_bid], k=1, now=0.0)
    winner = high_bid if high_bid_wins else low_bid
    assert shown(result) == [winner.ad_id]
    assert result.ads[0].ecpm == pytest.approx(1000 * winner.pctr * winner.bid)
    assert result.ads[0].bid == winner.bid and result.ads[0].pctr == winner.pctr


def test_ties_break_on_higher_pctr_then_ad_id():
    # 0.02 * 2 and 0.04 * 1 are the same double, so the two eCPMs really tie.
    candidates = [ad("z-low-pctr", bid=2.0, pctr=0.02), ad("b", bid=1.0, pctr=0.04), ad("a", bid=1.0, pctr=0.04)]
    result = Marketplace().run("u", {}, candidates, k=3, now=0.0)
    assert shown(result) == ["a", "b", "z-low-pctr"]


def test_k_larger_than_survivors_shows_every_survivor():
    market = Marketplace()
    market.upsert_campaign("blocked", targeting={"device": ["tv"]})
    candidates = [ad("a", pctr=0.2), ad("b", pctr=0.3), ad("c", campaign="blocked")]
    result = market.run("u", {"device": "mobile"}, candidates, k=10, now=0.0)
    assert shown(result) == ["b", "a"]
    assert result.removed["targeting"] == 1


def test_numpy_scores_come_out_as_plain_floats():
    result = Marketplace().run("u", {}, [ad("a", bid=np.float32(2.0), pctr=np.float32(0.25))], k=1, now=0.0)
    winner = result.ads[0]
    assert type(winner.pctr) is float and type(winner.bid) is float and type(winner.ecpm) is float
    assert winner.ecpm == pytest.approx(500.0)


# --- targeting -------------------------------------------------------------------------------


def test_targeting_on_a_request_key():
    market = Marketplace()
    market.upsert_campaign("mobile-only", targeting={"device": ["mobile"], "region": ["r1", "r2"]})
    candidates = [ad("m", campaign="mobile-only"), ad("free", campaign="unrestricted")]

    on_desktop = market.run("u", {"device": "desktop", "region": "r1"}, candidates, k=5, now=0.0)
    assert shown(on_desktop) == ["free"] and on_desktop.removed["targeting"] == 1

    wrong_region = market.run("u", {"device": "mobile", "region": "r9"}, candidates, k=5, now=0.0)
    assert shown(wrong_region) == ["free"] and wrong_region.removed["targeting"] == 1

    on_mobile = market.run("u", {"device": "mobile", "region": "r2"}, candidates, k=5, now=0.0)
    assert sorted(shown(on_mobile)) == ["free", "m"] and on_mobile.removed["targeting"] == 0


def test_targeting_on_an_ad_attribute_key():
    market = Marketplace()
    market.upsert_campaign("cat3", targeting={"category": ["cat3"]})
    candidates = [ad("in-cat3", campaign="cat3", category="cat3"), ad("in-cat1", campaign="cat3", category="cat1")]
    result = market.run("u", {"device": "mobile"}, candidates, k=5, now=0.0)
    assert shown(result) == ["in-cat3"]
    assert result.removed["targeting"] == 1


def test_a_missing_value_fails_the_restriction():
    market = Marketplace()
    market.upsert_campaign("r1", targeting={"region": ["r1"]})
    result = market.run("u", {"device": "mobile"}, [ad("a", campaign="r1")], k=1, now=0.0)
    assert result.ads == [] and result.removed["targeting"] == 1


# --- budgets ---------------------------------------------------------------------------------


def test_spend_accumulates_per_impression_and_a_reached_budget_stops_serving():
    market = Marketplace()
    market.upsert_campaign("c1", budget=0.25)
    candidate = ad("a", bid=2.0, pctr=0.05)  # expected cost per impression: 0.1
    results = [market.run(f"user-{i}", {}, [candidate], k=1, now=float(i)) for i in range(5)]

    assert [len(r.ads) for r in results] == [1, 1, 1, 0, 0]
    assert [r.removed["budget"] for r in results] == [0, 0, 0, 1, 1]
    # 0.2 < 0.25 lets the third impression through: the budget is crossed by one charge, no more.
    assert market.campaign("c1").spend == pytest.approx(0.3)


def test_a_budget_running_out_mid_auction_stops_the_campaigns_next_ad():
    market = Marketplace()
    market.upsert_campaign("c1", budget=0.05)
    candidates = [ad("a", pctr=0.2), ad("b", pctr=0.1), ad("other", campaign="c2", pctr=0.01)]
    result = market.run("u", {}, candidates, k=3, now=0.0)
    assert shown(result) == ["a", "other"]
    assert result.removed["budget"] == 1
    assert market.campaign("c1").spend == pytest.approx(0.2)


def test_without_expected_charges_only_real_charges_spend_the_budget():
    market = Marketplace(charge_per_impression="none")
    market.upsert_campaign("c1", budget=1.0)
    assert len(market.run("u", {}, [ad("a")], k=1, now=0.0).ads) == 1
    assert market.campaign("c1").spend == 0.0

    market.charge("c1", 0.6)
    market.charge("c1", 0.6)  # a click's cost may cross the budget once
    result = market.run("u", {}, [ad("a")], k=1, now=1.0)
    assert result.ads == [] and result.removed["budget"] == 1
    assert market.campaign("c1").spend == pytest.approx(1.2)


def test_unknown_campaigns_are_created_unrestricted_and_unlimited():
    market = Marketplace()
    assert market.campaign("new") is None
    market.run("u", {"device": "tv"}, [ad("a", campaign="new", bid=1.0, pctr=0.5)], k=1, now=0.0)
    campaign = market.campaign("new")
    assert campaign.budget is None and campaign.targeting == {} and campaign.spend == pytest.approx(0.5)


# --- frequency cap ---------------------------------------------------------------------------


def test_frequency_cap_allows_n_per_window_then_the_ad_comes_back():
    market = Marketplace(frequency_cap=FrequencyCap(max_impressions=2, window_s=60.0))
    candidates = [ad("a")]
    assert [len(market.run("u", {}, candidates, k=1, now=t).ads) for t in (0.0, 10.0)] == [1, 1]

    capped = market.run("u", {}, candidates, k=1, now=59.0)
    assert capped.ads == [] and capped.removed["frequency_cap"] == 1
    assert market.impressions("u", "a", now=59.0) == 2
    assert len(market.run("someone-else", {}, candidates, k=1, now=59.0).ads) == 1  # the cap is per user

    # At t=60 the impression from t=0 has left the window: one slot is free again.
    assert len(market.run("u", {}, candidates, k=1, now=60.0).ads) == 1
    assert market.impressions("u", "a", now=60.0) == 2
    assert market.impressions("u", "a", now=200.0) == 0


def test_the_injected_clock_is_used_when_now_is_not_given():
    clock_time = [100.0]
    market = Marketplace(frequency_cap=FrequencyCap(1, window_s=30.0), clock=lambda: clock_time[0])
    assert len(market.run("u", {}, [ad("a")], k=1).ads) == 1
    assert market.run("u", {}, [ad("a")], k=1).removed["frequency_cap"] == 1
    clock_time[0] = 130.0
    assert market.impressions("u", "a") == 0
    assert len(market.run("u", {}, [ad("a")], k=1).ads) == 1


def test_no_cap_remembers_nothing():
    market = Marketplace()
    for t in range(5):
        assert len(market.run("u", {}, [ad("a")], k=1, now=float(t)).ads) == 1
    assert market.impressions("u", "a", now=5.0) == 0
    assert market.snapshot()["tracked_pairs"] == 0


@pytest.mark.parametrize(
    ("trigger", "filled"),
    [({"sweep_every": 100}, 99), ({"sweep_size": 50}, 50)],  # the 100th auction; a table of 50 pairs
    ids=["every_n_auctions", "table_outgrows_its_size"],
)
def test_a_sweep_drops_expired_pairs(trigger, filled):
    market = Marketplace(frequency_cap=FrequencyCap(1, window_s=10.0), **trigger)
    for i in range(filled):
        market.run(f"user-{i}", {}, [ad("a")], k=1, now=0.0)
    assert market.snapshot()["tracked_pairs"] == filled
    market.run("late-user", {}, [ad("a")], k=1, now=20.0)  # sweeps: only its own pair is live
    assert market.snapshot()["tracked_pairs"] == 1


def test_default_sweep_runs_within_ten_thousand_auctions():
    market = Marketplace(frequency_cap=FrequencyCap(1, window_s=1000.0))
    for i in range(10_000):
        market.run(f"user-{i}", {}, [ad("a")], k=1, now=float(i))  # one new pair a second, each live for 1000 s
    # The sweep at auction 10,000 (t=9999) keeps only the pairs of the last 1000 s.
    assert market.snapshot()["tracked_pairs"] == 1000


# --- duplicates and accounting ---------------------------------------------------------------


def test_a_repeated_ad_id_is_removed_once_as_duplicate():
    result = Marketplace().run("u", {}, [ad("a", pctr=0.1), ad("a", pctr=0.9), ad("b")], k=5, now=0.0)
    assert sorted(shown(result)) == ["a", "b"]
    assert result.ads[0].pctr == 0.1  # the first occurrence stays
    assert result.removed == {"duplicate": 1, "targeting": 0, "budget": 0, "frequency_cap": 0}


def test_removed_counts_winners_and_losers_add_up_to_the_candidates():
    market = Marketplace(frequency_cap=FrequencyCap(1, window_s=60.0))
    market.upsert_campaign("tv", targeting={"device": ["tv"]})
    market.upsert_campaign("broke", budget=0.0)
    market.run("u", {}, [ad("seen")], k=1, now=0.0)

    candidates = [
        ad("seen"),  # frequency_cap
        ad("t1", campaign="tv"),
        ad("t2", campaign="tv"),  # targeting
        ad("b1", campaign="broke"),  # budget
        ad("t1", campaign="tv"),  # duplicate, though its first copy was removed for targeting
        *[ad(f"ok{i}", pctr=0.01 * (i + 1)) for i in range(6)],  # 6 survivors, 3 of which lose
    ]
    result = market.run("u", {"device": "mobile"}, candidates, k=3, now=1.0)
    assert result.candidates == len(candidates) == 11
    assert result.removed == {"duplicate": 1, "targeting": 2, "budget": 1, "frequency_cap": 1}
    assert shown(result) == ["ok5", "ok4", "ok3"]
    losers = 3
    assert sum(result.removed.values()) + len(result.ads) + losers == result.candidates


def test_every_rule_is_reported_even_for_an_empty_shortlist():
    result = Marketplace().run("u", {}, [], k=3, now=0.0)
    assert result.ads == [] and result.candidates == 0
    assert result.removed == dict.fromkeys(RULES, 0)


# --- campaigns and validation ----------------------------------------------------------------


def test_upsert_creates_then_updates_only_what_is_given():
    market = Marketplace()
    created = market.upsert_campaign("c1", budget=10.0, targeting={"device": ["mobile", "tablet"]})
    assert created.budget == 10.0 and created.targeting == {"device": frozenset({"mobile", "tablet"})}
    market.charge("c1", 2.5)

    market.upsert_campaign("c1", budget=20.0)
    kept_targeting = market.campaign("c1")
    assert kept_targeting.budget == 20.0 and kept_targeting.spend == 2.5 and "device" in kept_targeting.targeting

    market.upsert_campaign("c1", targeting={})
    cleared = market.campaign("c1")
    assert cleared.targeting == {} and cleared.budget == 20.0

    cleared.spend = 999.0  # a copy: the marketplace is unchanged
    assert market.snapshot()["campaigns"]["c1"] == {"budget": 20.0, "spend": 2.5, "targeting": {}}


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"budget": -1.0}, "budget"),
        ({"budget": math.nan}, "budget"),
        ({"budget": math.inf}, "budget"),
        ({"targeting": {"device": []}}, "empty"),
        ({"targeting": {"device": "mobile"}}, "list of strings"),
        ({"targeting": {"device": ["mobile", 3]}}, "only strings"),
        ({"targeting": {"": ["x"]}}, "keys"),
        ({"targeting": ["device"]}, "targeting must map"),
    ],
)
def test_upsert_rejects_bad_values_and_changes_nothing(arguments, message):
    market = Marketplace()
    market.upsert_campaign("c1", budget=5.0, targeting={"device": ["mobile"]})
    with pytest.raises(ValueError, match=message):
        market.upsert_campaign("c1", **arguments)
    assert market.snapshot()["campaigns"]["c1"] == {"budget": 5.0, "spend": 0.0, "targeting": {"device": ["mobile"]}}


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("pctr", math.nan, "pctr"), ("pctr", 1.5, "pctr"), ("bid", math.inf, "bid"), ("bid", -0.5, "bid")],
)
def test_invalid_candidates_are_refused_naming_the_field(field, value, message):
    values = {"ad_id": "a", "campaign_id": "c1", "bid": 1.0, "pctr": 0.1, field: value}
    with pytest.raises(ValueError, match=message):
        Candidate(**values)


@pytest.mark.parametrize("k", [0, -1])
def test_k_must_be_positive(k):
    with pytest.raises(ValueError, match="k must be"):
        Marketplace().run("u", {}, [ad("a")], k=k, now=0.0)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="charge_per_impression"):
        Marketplace(charge_per_impression="per_click")
    with pytest.raises(ValueError, match="max_impressions"):
        FrequencyCap(max_impressions=0, window_s=10.0)
    with pytest.raises(ValueError, match="window_s"):
        FrequencyCap(max_impressions=1, window_s=0.0)
    with pytest.raises(ValueError, match="amount"):
        Marketplace().charge("c1", -1.0)


# --- one actor, many callers -----------------------------------------------------------------


@pytest.mark.slow
def test_a_ray_actor_keeps_the_cap_exact_under_concurrent_calls(ray_session):
    """What Serve relies on: many replicas, one actor, the cap never overshoots."""
    market = ray.remote(Marketplace).options(name="test-auction-marketplace").remote(frequency_cap=FrequencyCap(max_impressions=3, window_s=3600.0))
    candidate = ad("ad-1", campaign="camp-1", bid=2.0, pctr=0.05)

    def page_view(_):
        return ray.get(market.run.remote("user-1", {"device": "mobile"}, [candidate], 1))

    try:
        with ThreadPoolExecutor(max_workers=16) as pool:
            results = list(pool.map(page_view, range(200)))
        assert sum(len(r.ads) for r in results) == 3
        assert sum(r.removed["frequency_cap"] for r in results) == 197
        assert ray.get(market.impressions.remote("user-1", "ad-1")) == 3
        snapshot = ray.get(market.snapshot.remote())
        assert snapshot["campaigns"]["camp-1"]["spend"] == pytest.approx(3 * 0.1)
        assert snapshot["tracked_pairs"] == 1
    finally:
        ray.kill(market)


def test_exploration_shows_other_ads_with_the_probability_it_logs():
    candidates = [Candidate(f"ad{i}", "c", bid=1.0, pctr=0.5 - 0.01 * i) for i in range(10)]
    greedy = Marketplace(explore=0.0).run("u", {}, candidates, 1)
    assert greedy.ads[0].ad_id == "ad0" and greedy.ads[0].propensity == 1.0
    market = Marketplace(explore=0.5, seed=3)
    firsts = [market.run(f"u{i}", {}, candidates, 1).ads[0] for i in range(4000)]
    top = [w for w in firsts if w.ad_id == "ad0"]
    assert {w.propensity for w in top} == {0.5 + 0.5 / 10}
    assert {w.propensity for w in firsts if w.ad_id != "ad0"} == {0.5 / 10}
    assert len(top) / len(firsts) == pytest.approx(0.55, abs=0.03)  # what the logged propensity says
    # IPS: summing 1 / propensity over one ad's impressions estimates how often a policy that always
    # showed it would have shown it, which is once per draw.
    weighted = sum(1 / w.propensity for w in firsts if w.ad_id == "ad3") / len(firsts)
    assert weighted == pytest.approx(1.0, abs=0.15)
    with pytest.raises(ValueError, match="explore"):
        Marketplace(explore=1.5)
