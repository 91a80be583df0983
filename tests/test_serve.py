"""The Serve app on the tiny run's exported model, called over real HTTP."""

import asyncio
import inspect
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401
import pyarrow.parquet as pq
import pytest
import ray
import yaml
from ray import serve
from ray.exceptions import ActorDiedError

from adrec import export
from adrec.ads import AdUpdate
from adrec.features import OOV, FeatureMap
from adrec.feedback.compact import run_compaction
from adrec.feedback.tokens import Impression, Signer
from adrec.recommend import FeatureBuilder, UserQuery, UserStore, feature_builder, user_key
from adrec.runtime import wait_until_ok
from serve.app import build_app, shutdown
from serve.ingress import Ingress
from serve.schemas import AppArgs
from serve.versions import STATE_NAMESPACE
from tests.conftest import compose_config, free_port

pytestmark = pytest.mark.slow
MAX_K = 20
TOKEN = "test-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
CAP = 2  # impressions of one ad per user per hour
SECRET = "a-feedback-secret-for-the-tests-only"
TOKEN_TTL_S = 600


@pytest.fixture(scope="module")
def feedback_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("feedback")


@pytest.fixture(scope="module")
def app_url(tiny_run, feedback_dir):
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    models_root = tiny_run["cfg"].paths.models_dir  # a registry root: LATEST picks the version
    args = AppArgs(
        model_dir=models_root,
        max_k=MAX_K,
        max_history=5,
        admin_token=TOKEN,
        poll_s=0.2,
        frequency_cap={"max_impressions": CAP, "window_s": 3600},
        user_encoder={"min_replicas": 2, "max_replicas": 2},  # two, so one can be killed under load
        feedback_dir=str(feedback_dir),
        feedback_secret=SECRET,
        token_ttl_s=TOKEN_TTL_S,
        # The fault tests count failed requests; on a 2-core box a request can stall past the
        # default 500 ms while Serve starts a replacement replica. The deadline's own test sets tmax_ms.
        deadline_ms=5_000,
    )
    serve.run(build_app(args), name="adrec", route_prefix="/", logging_config={"enable_access_log": False})
    yield f"http://127.0.0.1:{port}"
    shutdown("adrec")
    serve.shutdown()


@pytest.fixture(scope="module")
def catalog(tiny_run):
    return set(pq.read_table(Path(tiny_run["export"]["model_dir"]) / "ads.parquet")["raw_ad_id"].to_pylist())


def known_user(tiny_run) -> str:
    users = pq.read_table(Path(tiny_run["export"]["model_dir"]) / "users.parquet")
    return users.filter(pa.compute.list_value_length(users["history"]).to_numpy() > 0)["raw_user_id"][0].as_py()


def test_healthz_names_the_serving_version(app_url, tiny_run):
    answer = httpx.get(f"{app_url}/healthz", timeout=30)
    assert answer.status_code == 200
    assert answer.json()["model_version"] == tiny_run["export"]["version"]


def recommend(app_url: str, **body) -> dict:
    answer = httpx.post(f"{app_url}/recommend", json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()


@pytest.mark.parametrize("k", [1, 10, MAX_K])
def test_recommend_returns_k_distinct_catalog_ads_by_ecpm(app_url, tiny_run, catalog, k):
    data = recommend(app_url, user_id=f"{known_user(tiny_run)}", k=k, context={"slot": "top", "device": "mobile"})
    ids = [ad["ad_id"] for ad in data["ads"]]
    assert len(ids) == k == len(set(ids)) and set(ids) <= catalog
    ecpm = [ad["ecpm"] for ad in data["ads"]]
    assert ecpm == sorted(ecpm, reverse=True)
    for ad in data["ads"]:
        assert 0.0 < ad["pctr"] < 1.0 and ad["bid"] > 0
        assert ad["ecpm"] == pytest.approx(1000 * ad["pctr"] * ad["bid"], rel=1e-5)
    assert data["model_version"] == tiny_run["export"]["version"]
    assert data["candidates"] >= k and set(data["removed"]) == {"duplicate", "targeting", "budget", "frequency_cap"}
    assert data["cold_start"] is False


def test_the_response_says_where_the_time_went(app_url):
    answer = httpx.post(f"{app_url}/recommend", json={"user_id": "timing-user", "k": 3}, timeout=30)
    hops = dict(part.split(";dur=") for part in answer.headers["server-timing"].split(", "))
    assert {"features", "encode", "index", "rank", "hops", "auction", "total"} <= set(hops)
    assert float(hops["total"]) >= float(hops["encode"]) + float(hops["index"]) + float(hops["rank"])


def test_an_unknown_user_gets_a_cold_start_from_features_context_and_popularity(app_url, catalog):
    data = recommend(app_url, user_id="someone-new", k=5, attributes={"age_bucket": "25-34"}, context={"device": "mobile"})
    assert data["cold_start"] is True
    assert len({ad["ad_id"] for ad in data["ads"]} & catalog) == 5


def test_recent_clicks_in_the_request_change_the_ranking(app_url, tiny_run):
    # Two different known ads as the only history: the user tower and the ranker must see which ones.
    known = FeatureMap.load(Path(tiny_run["export"]["model_dir"]) / "feature_map.json").vocabularies["ad_id"].values
    one = recommend(app_url, user_id="new-a", k=10, recent_ad_ids=[known[0]])
    other = recommend(app_url, user_id="new-b", k=10, recent_ad_ids=[known[1]])
    assert [a["pctr"] for a in one["ads"]] != [a["pctr"] for a in other["ads"]]
    assert one["cold_start"] is False


def test_frequency_cap_stops_an_ad_after_n_impressions_per_user(app_url):
    seen: dict[str, int] = {}
    answers = [recommend(app_url, user_id="capped-user", k=5) for _ in range(CAP + 2)]
    for answer in answers:
        for ad in answer["ads"]:
            seen[ad["ad_id"]] = seen.get(ad["ad_id"], 0) + 1
    assert max(seen.values()) == CAP  # the best ads were shown exactly CAP times, never more
    assert answers[0]["removed"]["frequency_cap"] == 0 and answers[-1]["removed"]["frequency_cap"] >= 5


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"k": 5}, "user_id"),
        ({"user_id": "", "k": 5}, "user_id"),
        ({"user_id": "u1", "k": "ten"}, "k"),
        ({"user_id": "u1", "k": 0}, "k"),
        ({"user_id": "u1", "context": "top"}, "context"),
        ({"user_id": "u" * 300}, "user_id"),
        ({"user_id": "u1", "recent_ad_ids": ["a" * 300]}, "recent_ad_ids"),
        ({"user_id": "u1", "context": {f"key{i}": "v" for i in range(17)}}, "context"),
        ({"user_id": "u1", "topk": 3}, "topk"),
        ({"user_id": "u1", "context": {"devise": "mobile"}}, "devise"),
        ({"user_id": "u1", "attributes": {"age": "30"}}, "age"),
        ({"user_id": "u1", "tmax_ms": -1}, "tmax_ms"),
        ({"user_id": "u1", "k": "10"}, "k"),  # JSON Schema's integer is no string: no lax conversion
        ({"user_id": "u1", "tmax_ms": True}, "tmax_ms"),
        # The app's limits are in the OpenAPI document (maximum, maxItems), so beyond them is a 422 like any schema violation.
        ({"user_id": "u1", "k": MAX_K + 1}, "k"),
        ({"user_id": "u1", "recent_ad_ids": ["a1"] * 6}, "recent_ad_ids"),
    ],
)
def test_malformed_requests_get_422_naming_the_field(app_url, body, field):
    answer = httpx.post(f"{app_url}/recommend", json=body, timeout=30)
    assert answer.status_code == 422
    assert any(field in error["loc"] for error in error_items(answer))


def error_items(answer: httpx.Response) -> list[dict]:
    """The items of an error body, checked to have the one documented shape: {"detail": [{loc, msg, type}]}."""
    body = answer.json()
    assert set(body) == {"detail"} and isinstance(body["detail"], list) and body["detail"], body
    for item in body["detail"]:
        assert set(item) == {"loc", "msg", "type"} and isinstance(item["loc"], list) and item["msg"] and item["type"], item
    return body["detail"]


def test_a_body_over_the_limit_gets_413(app_url):
    body = {"user_id": "u1", "recent_ad_ids": ["a" * 200] * 400}  # 80 KB: over max_body_bytes
    answer = httpx.post(f"{app_url}/recommend", json=body, timeout=30)
    assert answer.status_code == 413 and error_items(answer)[0]["loc"] == ["body"]


def test_a_streamed_body_over_the_limit_gets_413(app_url):
    chunks = (b'{"user_id": "u1", "recent_ad_ids": [' + b'"a",' * 20_000 + b'"a"]}' for _ in range(1))  # no Content-Length
    answer = httpx.post(f"{app_url}/recommend", content=chunks, headers={"content-type": "application/json"}, timeout=30)
    assert answer.status_code == 413 and error_items(answer)[0]["type"] == "too_large"


@pytest.mark.parametrize(("content", "status"), [(b"{not json", 422), (b'{"user_id": "\xff\xfe"}', 400)])
def test_a_body_that_is_not_json_gets_an_error_in_the_one_shape(app_url, content, status):
    answer = httpx.post(f"{app_url}/recommend", content=content, headers={"content-type": "application/json"}, timeout=30)
    assert answer.status_code == status
    error_items(answer)


def test_a_missed_deadline_is_a_503_with_a_message_not_a_hang(app_url):
    started = time.monotonic()
    answer = httpx.post(f"{app_url}/recommend", json={"user_id": "hurried", "k": 5, "tmax_ms": 0.01}, timeout=30)
    assert answer.status_code == 503 and "within" in error_items(answer)[0]["msg"]
    assert time.monotonic() - started < 5


# Every status each endpoint can answer, besides 200: what a generated client must be told.
DOCUMENTED = {
    ("/recommend", "post"): {"400", "413", "422", "503"},
    ("/ads/{ad_id}", "put"): {"400", "401", "403", "413", "422"},
    ("/feedback", "post"): {"400", "403", "413", "422", "503"},
    ("/admin/reload", "post"): {"202", "400", "401", "403", "404", "413", "422"},
}


def test_openapi_documents_every_endpoint_and_every_status(app_url):
    assert httpx.get(f"{app_url}/docs", timeout=30).status_code == 200
    paths = httpx.get(f"{app_url}/openapi.json", timeout=30).json()["paths"]
    assert {"/recommend", "/ads/{ad_id}", "/admin/reload", "/model", "/healthz", "/feedback"} <= set(paths)
    for (path, method), statuses in DOCUMENTED.items():
        assert set(paths[path][method]["responses"]) == {"200", *statuses}, (path, method)
        error = paths[path][method]["responses"]["422"]["content"]["application/json"]["schema"]
        assert error == {"$ref": "#/components/schemas/ErrorBody"}
    assert paths["/ads/{ad_id}"]["put"]["security"] == [{"HTTPBearer": []}]


def test_openapi_states_what_this_model_accepts(app_url, tiny_run):
    schemas = httpx.get(f"{app_url}/openapi.json", timeout=30).json()["components"]["schemas"]
    attributes = schemas["AdRequest"]["properties"]["attributes"]
    assert attributes["required"] == ["advertiser_id", "category", "tokens"] and attributes["additionalProperties"] is False
    assert "attributes" in schemas["AdRequest"]["required"]
    request = schemas["RecommendRequest"]["properties"]
    assert request["k"]["maximum"] == MAX_K and request["recent_ad_ids"]["maxItems"] == 5
    assert set(request["context"]["properties"]) == {"slot", "device"} and request["context"]["additionalProperties"] is False


def test_model_endpoint_names_the_version_and_the_index(app_url, tiny_run, catalog):
    info = httpx.get(f"{app_url}/model", timeout=30).json()
    assert info["version"] == tiny_run["export"]["version"]
    assert info["index"]["kind"] == "exact" and info["index"]["size"] >= len(catalog)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}])
def test_write_endpoints_need_the_bearer_token(app_url, headers):
    ad = {"campaign_id": "c-x", "bid": 1.0}
    assert httpx.put(f"{app_url}/ads/unauthorised-ad", json=ad, headers=headers, timeout=30).status_code == 401
    assert httpx.post(f"{app_url}/admin/reload", json={}, headers=headers, timeout=30).status_code == 401


def top_ad_attributes(tiny_run, ad_id: str) -> dict:
    """The raw attributes of a logged ad, to create a look-alike with the same content."""
    ads = pq.read_table(Path(tiny_run["cfg"].paths.raw_dir) / "ads").to_pylist()
    row = next(a for a in ads if a["ad_id"] == ad_id)
    return {"advertiser_id": row["advertiser_id"], "category": row["category"], "tokens": row["tokens"]}


def put_ad(app_url, ad_id: str, **ad) -> httpx.Response:
    return httpx.put(f"{app_url}/ads/{ad_id}", json=ad, headers=ADMIN, timeout=60)


def test_a_new_ad_is_embedded_indexed_and_served_without_a_restart(app_url, tiny_run):
    user = "lookalike-user"
    best = recommend(app_url, user_id=user, k=1, context={"device": "mobile"})["ads"][0]
    attributes = top_ad_attributes(tiny_run, best["ad_id"])
    size = httpx.get(f"{app_url}/model", timeout=30).json()["index"]["size"]
    answer = put_ad(app_url, "brand-new-ad", campaign_id="new-campaign", bid=500.0, attributes=attributes)
    assert answer.status_code == 200, answer.text
    assert answer.json()["index_size"] == size + 1
    served = recommend(app_url, user_id=f"{user}-2", k=3, context={"device": "mobile"})["ads"]
    assert served[0]["ad_id"] == "brand-new-ad" and served[0]["campaign_id"] == "new-campaign"


def test_budget_and_targeting_remove_ads_and_say_so(app_url, tiny_run, catalog):
    served = recommend(app_url, user_id="rules-user", k=5, context={"device": "mobile"})["ads"]
    attributes = top_ad_attributes(tiny_run, next(ad["ad_id"] for ad in served if ad["ad_id"] in catalog))
    assert put_ad(app_url, "spent-ad", campaign_id="spent", bid=900.0, attributes=attributes, budget=0.0).status_code == 200
    targeted = {"device": ["tablet"]}
    assert put_ad(app_url, "tablet-ad", campaign_id="tablets", bid=800.0, attributes=attributes, targeting=targeted).status_code == 200
    on_mobile = recommend(app_url, user_id="rules-user-2", k=MAX_K, context={"device": "mobile"})
    served = {ad["ad_id"] for ad in on_mobile["ads"]}
    assert "spent-ad" not in served and "tablet-ad" not in served
    assert on_mobile["removed"]["budget"] >= 1 and on_mobile["removed"]["targeting"] >= 1
    on_tablet = recommend(app_url, user_id="rules-user-3", k=MAX_K, context={"device": "tablet"})
    assert on_tablet["ads"][0]["ad_id"] == "tablet-ad"


COMPLETE = {"advertiser_id": "adv1", "category": "cat1", "tokens": ["shoes"]}


@pytest.mark.parametrize(
    ("ad", "field"),
    [
        ({"campaign_id": "c", "bid": -1, "attributes": COMPLETE}, "bid"),
        ({"campaign_id": "c", "bid": 1e12, "attributes": COMPLETE}, "bid"),  # past float32-safe bids
        ({"campaign_id": "c", "bid": "1", "attributes": COMPLETE}, "bid"),
        ({"campaign_id": "c", "bid": 1, "attributes": {**COMPLETE, "colour": "red"}}, "colour"),
        ({"campaign_id": "c", "bid": 1, "attributes": {**COMPLETE, "category": ["cat1", "cat2"]}}, "category"),
        ({"campaign_id": "c", "bid": 1, "attributes": {"advertiser_id": "adv1", "tokens": []}}, "category"),
        ({"bid": 1, "attributes": COMPLETE}, "campaign_id"),
        ({"campaign_id": "c", "bid": 1, "budget": -5, "attributes": COMPLETE}, "budget"),
        ({"campaign_id": "c", "bid": 1, "budget": False, "attributes": COMPLETE}, "budget"),
    ],
)
def test_bad_ads_get_422_naming_the_field(app_url, ad, field):
    answer = put_ad(app_url, "bad-ad", **ad)
    assert answer.status_code == 422, ad
    assert any(field in error["loc"] for error in error_items(answer))


def market_campaign(campaign_id: str):
    return ray.get(ray.get_actor("adrec-market", namespace=STATE_NAMESPACE).campaign.remote(campaign_id))


def test_a_schema_valid_ad_the_model_cannot_encode_gets_422_and_every_endpoint_keeps_answering(app_url):
    """The outage: an ad without the ad tower's inputs used to be logged, and every replica's catch-up then failed."""
    logged = httpx.get(f"{app_url}/model", timeout=30).json()["ad_updates"]["logged"]
    answer = put_ad(app_url, "0", attributes={}, bid=1.0, budget=0.0, campaign_id="cmp284", targeting={})
    assert answer.status_code == 422, answer.text
    missing = {tuple(error["loc"]) for error in error_items(answer) if error["type"] == "missing"}
    assert missing == {("body", "attributes", name) for name in COMPLETE}
    model = httpx.get(f"{app_url}/model", timeout=30)
    assert model.status_code == 200 and model.json()["ad_updates"]["logged"] == logged  # never logged
    assert market_campaign("cmp284") is None  # nor its budget taken
    assert httpx.post(f"{app_url}/recommend", json={"user_id": "u7", "k": 3}, timeout=30).status_code == 200


def wait_for_model(app_url: str, done, timeout_s: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        info = httpx.get(f"{app_url}/model", timeout=30).json()
        if done(info) or time.monotonic() > deadline:
            return info
        time.sleep(0.2)


def test_a_bad_update_already_in_the_log_is_skipped_reported_and_the_app_keeps_serving(app_url, tiny_run):
    state = ray.get_actor("adrec-state", namespace=STATE_NAMESPACE)
    poison = ray.get(state.add_ad.remote(AdUpdate("poison-ad", "poison-campaign", 1.0, {})))  # past the ingress's check
    info = wait_for_model(app_url, lambda i: i["ad_updates"]["ad_index"]["applied"] >= poison and i["ad_updates"]["ranker"]["applied"] >= poison)
    for deployment in ("ad_index", "ranker"):
        report = info["ad_updates"][deployment]
        assert report["applied"] >= poison and report["rejected"] >= 1, info
        assert report["latest_rejected"][-1]["ad_id"] == "poison-ad" and "advertiser_id" in report["latest_rejected"][-1]["reason"]
    for i in range(3):
        assert httpx.post(f"{app_url}/recommend", json={"user_id": f"after-poison-{i}", "k": 3}, timeout=30).status_code == 200
    # The log goes on: a good ad after the bad one is indexed, in the row every replica agrees on.
    size = info["index"]["size"]
    answer = put_ad(
        app_url, "after-poison-ad", campaign_id="after-poison", bid=1.0, attributes=top_ad_attributes(tiny_run, next(iter(known_ads(tiny_run))))
    )
    assert answer.status_code == 200 and answer.json()["index_size"] == size + 1, answer.text


def known_ads(tiny_run) -> list[str]:
    return pq.read_table(Path(tiny_run["cfg"].paths.raw_dir) / "ads", columns=["ad_id"])["ad_id"].to_pylist()


ENOUGH_REQUESTS = 40  # what a Load answers at least before it stops; tests assert more than 20 succeeded


class Load:
    """Closed-loop /recommend traffic from ``clients`` threads, counting every non-2xx answer or error."""

    def __init__(self, app_url: str, clients: int = 3) -> None:
        self.url, self.stop, self.ok, self.failed = f"{app_url}/recommend", threading.Event(), 0, []
        self.threads = [threading.Thread(target=self._client, args=(i,)) for i in range(clients)]

    def _client(self, i: int) -> None:
        with httpx.Client(timeout=30) as client:
            n = 0
            while not self.stop.is_set():
                n += 1
                try:
                    answer = client.post(self.url, json={"user_id": f"load-{i}-{n}", "k": 5})
                    if answer.status_code // 100 == 2:
                        self.ok += 1
                    else:
                        self.failed.append(f"{answer.status_code} {answer.text[:200]}")
                except httpx.HTTPError as error:
                    self.failed.append(repr(error))

    def __enter__(self) -> "Load":
        for thread in self.threads:
            thread.start()
        time.sleep(1.0)
        return self

    def __exit__(self, *exc) -> None:
        # At least a second more, and enough answers to count on a loaded machine (30 s at most).
        deadline = time.monotonic() + 30
        time.sleep(1.0)
        while self.ok + len(self.failed) < ENOUGH_REQUESTS and time.monotonic() < deadline:
            time.sleep(0.1)
        self.stop.set()
        for thread in self.threads:
            thread.join()


def encoder_replicas() -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "UserEncoder" in a["name"] and a["namespace"] == "serve"]


def test_killing_one_of_two_encoder_replicas_under_load_fails_no_request(app_url):
    replicas = encoder_replicas()
    assert len(replicas) == 2, replicas
    with Load(app_url) as load:
        ray.kill(ray.get_actor(replicas[0], namespace="serve"), no_restart=True)
        time.sleep(3.0)
    assert load.ok > 20 and load.failed == [], load.failed[:5]
    deadline = time.monotonic() + 60
    while len(encoder_replicas()) < 2 and time.monotonic() < deadline:  # Serve replaces it
        time.sleep(1)
    assert len(encoder_replicas()) == 2


class Chains:
    """Stand-in model chains for the ingress's hedging: each (outcome, seconds) in turn."""

    def __init__(self, *behaviours: tuple[str, float]) -> None:
        self.behaviours, self.sent = iter(behaviours), 0

    async def chain(self, *args):
        self.sent += 1
        number, (outcome, seconds) = self.sent, next(self.behaviours)
        await asyncio.sleep(seconds)
        if outcome == "dead":
            raise ActorDiedError()
        if outcome == "bug":
            raise ValueError("a bug, not a lost replica")
        return f"answer of chain {number}"


@pytest.mark.parametrize(
    "behaviours, answer, sent",
    [
        ([("ok", 0.01)], "answer of chain 1", 1),
        ([("ok", 60), ("ok", 0.01)], "answer of chain 2", 2),  # stalled: a second chain answers
        ([("ok", 0.7), ("ok", 60)], "answer of chain 1", 2),  # slow but healthy: a second is sent at 0.5 s, the first still wins
        ([("dead", 0.01), ("ok", 0.01)], "answer of chain 2", 2),
        ([("bug", 0.01)], ValueError, 1),  # not retried
        ([("dead", 0.01)] * 3, ActorDiedError, 3),
        ([("ok", 60)] * 3, asyncio.TimeoutError, 3),
    ],
)
def test_the_model_chain_is_hedged_within_the_deadline(behaviours, answer, sent):
    chains = Chains(*behaviours)
    call = Ingress.func_or_class.retrieve_and_rank(chains, {}, False, 10, "model", 0, time.perf_counter() + 1.0)
    if isinstance(answer, str):
        assert asyncio.run(call) == answer
    else:
        with pytest.raises(answer):
            asyncio.run(call)
    assert chains.sent == sent


def test_a_reload_under_load_swaps_the_version_and_fails_no_request(app_url, tiny_run):
    second = export.run(tiny_run["cfg"])  # a new version of the same model; LATEST now names it
    before = httpx.get(f"{app_url}/model", timeout=30).json()["version"]
    with Load(app_url) as load:
        answer = httpx.post(f"{app_url}/admin/reload", json={"version": second["version"]}, headers=ADMIN, timeout=120)
    assert answer.status_code == 200, answer.text
    assert load.ok > 20 and load.failed == [], load.failed[:5]
    info = httpx.get(f"{app_url}/model", timeout=30).json()
    assert before != second["version"] == info["version"] and info["previous"] == before
    assert recommend(app_url, user_id="after-reload", k=3)["model_version"] == second["version"]
    for version in ("v-none", ".."):
        missing = httpx.post(f"{app_url}/admin/reload", json={"version": version}, headers=ADMIN, timeout=30)
        assert missing.status_code == 404 and "version" in error_items(missing)[0]["loc"], version


def feedback(app_url: str, events: list[dict]) -> httpx.Response:
    return httpx.post(f"{app_url}/feedback", json={"events": events}, timeout=60)


def test_feedback_needs_a_valid_token_for_the_same_user(app_url):
    ad = recommend(app_url, user_id="fb-user", k=1)["ads"][0]
    click = {"event_id": "fb-click-1", "event": "click", "user_id": "fb-user", "token": ad["token"]}
    assert feedback(app_url, [click]).json() == {"accepted": 1}
    payload, mac = ad["token"].split(".")
    edited = (
        Signer(b"another-secret-of-enough-length", TOKEN_TTL_S)
        .sign(Impression("r", user_key("fb-user"), "a-expensive", "v", time.time()))
        .split(".")[0]
    )
    expired = Signer(SECRET.encode(), TOKEN_TTL_S).sign(Impression("r", user_key("fb-user"), ad["ad_id"], "v", time.time() - 2 * TOKEN_TTL_S))
    for token, reason in [(f"{edited}.{mac}", "invalid"), (expired, "expired"), ("garbage", "malformed")]:
        answer = feedback(app_url, [click, {**click, "event_id": "fb-bad", "token": token}])
        assert answer.status_code == 403 and reason in answer.json()["detail"][0]["msg"]
        assert answer.json()["detail"][0]["loc"] == ["body", "events", 1, "token"]  # and nothing of the batch was written
    other_user = feedback(app_url, [{**click, "user_id": "someone-else"}])
    assert other_user.status_code == 403 and "another user" in other_user.json()["detail"][0]["msg"]
    assert feedback(app_url, [{**click, "event": "purchase"}]).status_code == 422


def test_killing_the_ingress_while_clients_post_feedback_loses_no_acknowledged_event(app_url, feedback_dir, tmp_path):
    tokens = [ad["token"] for ad in recommend(app_url, user_id="fb-load", k=10)["ads"]]
    acked, stop = [], threading.Event()

    def client(c: int) -> None:
        with httpx.Client(timeout=30) as http:
            n = 0
            while not stop.is_set():
                n += 1
                ids = [f"load-{c}-{n}-{i}" for i in range(5)]
                events = [{"event_id": e, "event": "click", "user_id": "fb-load", "token": tokens[i % len(tokens)]} for i, e in enumerate(ids)]
                try:
                    if http.post(f"{app_url}/feedback", json={"events": events}).status_code == 200:
                        acked.extend(ids)
                except httpx.HTTPError:
                    pass  # not acknowledged: an at-least-once client would retry it

    threads = [threading.Thread(target=client, args=(c,)) for c in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(1.5)
    (ingress,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "Ingress" in a["name"] and a["namespace"] == "serve"]
    ray.kill(ray.get_actor(ingress, namespace="serve"), no_restart=True)
    time.sleep(1.0)
    stop.set()
    for thread in threads:
        thread.join()
    wait_until_ok(f"{app_url}/healthz", timeout_s=90)  # Serve brings a new ingress up
    counts = run_compaction(feedback_dir, tmp_path / "raw", attribution_window_s=3600)
    ids = pq.read_table(tmp_path / "raw" / "events")["event_id"].to_pylist()
    assert len(acked) > 20 and set(acked) <= set(ids), sorted(set(acked) - set(ids))[:5]
    assert len(ids) == len(set(ids)) and counts["clicks"] == len([i for i in ids if i.startswith(("load-", "fb-click"))])


def test_serve_config_yaml_is_a_valid_app():
    config = yaml.safe_load((Path(__file__).parents[1] / "serve" / "config.yaml").read_text())
    (app,) = config["applications"]
    assert app["import_path"] == "serve.app:build_app"
    # What `serve run` validates the args against: the class itself (a postponed string annotation passes a bare dict).
    assert inspect.signature(build_app).parameters["args"].annotation is AppArgs
    AppArgs(**app["args"])  # unknown keys are errors, so a typo in the YAML fails here
    with pytest.raises(ValueError, match="max_replica"):
        AppArgs(**{**app["args"], "user_encoder": {"max_replica": 3}})
    with pytest.raises(ValueError, match="above max_replicas"):
        AppArgs(**{**app["args"], "user_encoder": {"min_replicas": 3, "max_replicas": 1}})


def test_a_misspelled_serve_setting_is_an_error_naming_it(tmp_path):
    """The Hydra serve group feeds AppArgs; a typo must not start an app with the default instead."""
    from omegaconf import OmegaConf

    from serve.launch import app_args

    settings = OmegaConf.to_container(compose_config(tmp_path, "+serve.app.max_kk=20", "+serve.app.max_history=5").serve.app, resolve=True)
    with pytest.raises(ValueError, match=r"serve\.app\.max_kk: Extra inputs are not permitted"):
        app_args(settings)
    del settings["max_kk"]
    assert app_args(settings).max_history == 5  # and a correct one is applied


def test_feature_builder_merges_request_and_stored_history(tiny_run):
    builder = feature_builder(Path(tiny_run["export"]["model_dir"]))
    user = known_user(tiny_run)
    stored = builder.store.history[builder.store.row(user)]
    recent_ad = pq.read_table(Path(tiny_run["export"]["model_dir"]) / "ads.parquet")["raw_ad_id"][0].as_py()
    features = builder.build([UserQuery(user, recent_ad_ids=[recent_ad]), UserQuery("someone-new")])
    length = features["history_len"][0]
    expected = ([recent_ad] + stored)[: features["history"].shape[1]]
    encoded = builder.feature_map.vocabularies["ad_id"].encode(pa.array(expected))
    assert features["history"][0, :length].tolist() == encoded.tolist()
    assert features["user_id"][1] == OOV and features["history_len"][1] == 0
    # Each history ad's category comes from the catalog, as in preparation.
    assert features["history_category_len"][0] == length


def test_a_logged_request_gives_the_training_tensors(tiny_run):
    """Parity: the same impression, as a prepared example and as a raw request, encodes identically."""
    cfg = tiny_run["cfg"]
    prepared = Path(cfg.paths.prepared_dir)
    fm = FeatureMap.load(prepared / "feature_map.json")
    log = pq.read_table(Path(cfg.paths.raw_dir) / "events").to_pandas()
    log = log[~log.event_id.str.startswith("bad-")].assign(t=lambda d: d.ts.astype("datetime64[ms, UTC]").astype("int64"))
    clicks = log[log.event == "click"].sort_values("t")
    profiles = pq.read_table(Path(cfg.paths.raw_dir) / "users").to_pandas().set_index("user_id")
    examples = pq.read_table(prepared / "test").to_pandas()
    examples = examples[examples.user_id > OOV].head(300)

    queries = []
    for row in examples.itertuples():
        user = fm.vocabularies["user_id"].values[row.user_id - 2]
        (impression,) = log[(log.user_id == user) & (log.t == row.ts) & (log.event == "impression")].itertuples()
        earlier = clicks[(clicks.user_id == user) & (clicks.t < row.ts)].ad_id.tolist()[::-1]
        queries.append(
            UserQuery(
                user,
                recent_ad_ids=earlier,
                attributes={k: profiles.loc[user, k] for k in ("age_bucket", "gender", "region")},
                context={"slot": impression.slot, "device": impression.device},
            )
        )
    no_state = pa.table({"raw_user_id": pa.array([], pa.string()), "history": pa.array([], pa.list_(pa.string()))})
    catalog = pq.read_table(Path(cfg.paths.raw_dir) / "ads")
    lookups = {"category": (catalog["ad_id"].combine_chunks(), catalog["category"].combine_chunks())}
    built = FeatureBuilder(fm, UserStore(no_state, fm), lookups).build(queries)
    user_inputs = [f.name for f in fm.features if f.group in ("user", "context")]
    assert user_inputs == ["user_id", "history", "history_category", "slot", "device", "age_bucket", "gender", "region"]
    for name in user_inputs:
        expected = np.stack(examples[name].to_numpy()) if name.startswith("history") else examples[name].to_numpy()
        assert (built[name] == expected).all(), name


def test_build_app_says_why_the_app_cannot_start(tiny_run, tmp_path, monkeypatch):
    """What only a replica would find (and `serve run` would print only as "Failed to update the deployments")."""
    models = tiny_run["cfg"].paths.models_dir
    with pytest.raises(ValueError, match="at least 16"):
        build_app(AppArgs(model_dir=models, feedback_secret="short"))
    monkeypatch.setenv("ADREC_FEEDBACK_SECRET", "short")
    with pytest.raises(ValueError, match="ADREC_FEEDBACK_SECRET"):
        build_app(AppArgs(model_dir=models))
    monkeypatch.delenv("ADREC_FEEDBACK_SECRET")
    with pytest.raises(ValueError, match="model_dir: .*run jobs/export.py first"):
        build_app(AppArgs(model_dir=str(tmp_path / "nowhere")))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_run["export"]["model_dir"], broken)
    (broken / "ads.parquet").write_bytes(b"not the exported file")
    with pytest.raises(ValueError, match="model_dir: .*ads.parquet"):
        build_app(AppArgs(model_dir=str(broken)))
    build_app(AppArgs(model_dir=models, feedback_secret=SECRET))  # and a sound configuration builds


@pytest.fixture
def fuzz_app_url(app_url, tiny_run, tmp_path):
    """A second app in the same Serve instance, so the fuzzer's ads and campaigns stay out of the other tests' app."""
    none = {"num_cpus": 0}  # beside the main app's replicas on two cores
    args = AppArgs(
        model_dir=tiny_run["cfg"].paths.models_dir,
        admin_token=TOKEN,
        feedback_dir=str(tmp_path / "feedback"),
        feedback_secret=SECRET,
        deadline_ms=5_000,
        ingress=none,
        user_encoder=none,
        ad_index=none,
        ranker=none,
    )
    serve.run(build_app(args), name="fuzz", route_prefix="/fuzz", logging_config={"enable_access_log": False})
    yield f"{app_url}/fuzz"
    shutdown("fuzz")


def test_a_schema_driven_fuzzer_finds_no_server_error_schema_violation_or_undocumented_status(fuzz_app_url, tmp_path):
    """schemathesis over every operation with the admin token, every check; bounded to 75 s of fuzzing."""
    config = Path(__file__).parent / "schemathesis.toml"
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(config),
        "run",
        f"{fuzz_app_url}/openapi.json",
        "--url",
        fuzz_app_url,
        "--checks",
        "all",
        "--header",
        f"Authorization: Bearer {TOKEN}",
        "--max-examples",
        "15",
        "--max-time",
        "75",
        "--seed",
        "20261202",
        "--request-timeout",
        "20",
        "--no-color",
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0 and "No issues found" in run.stdout and "6/6" in run.stdout, fuzz_findings(run.stdout) + run.stderr[-2000:]


def fuzz_findings(report: str) -> str:
    """The lines of a schemathesis report that say what failed, without the generated payloads."""
    keep = ("___", "- ST", "[", "Received", "Documented", "Expected", "Invalid", "Failures", "Test cases", "Seed", "st replay")
    return "\n".join(line[:300] for line in report.splitlines() if line.strip().startswith(keep))
