"""The Serve app on the tiny run's exported model, called over real HTTP."""

import socket
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401
import pyarrow.parquet as pq
import pytest
import yaml
from ray import serve

from adrec.features import OOV, FeatureMap
from adrec.recommend import FeatureBuilder, ServingModel, UserQuery, UserStore
from serve.app import AppArgs, build_app

pytestmark = pytest.mark.slow
MAX_K = 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tiny_run):
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    models_root = tiny_run["cfg"].paths.models_dir  # a registry root: LATEST picks the version
    serve.run(build_app(AppArgs(model_dir=models_root, max_k=MAX_K, max_history=5)), name="adrec", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
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


@pytest.mark.parametrize("k", [1, 10, MAX_K])
def test_recommend_returns_k_distinct_catalog_ads_best_first(app_url, tiny_run, catalog, k):
    body = {"user_id": known_user(tiny_run), "k": k, "context": {"slot": "top", "device": "mobile"}}
    answer = httpx.post(f"{app_url}/recommend", json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    data = answer.json()
    ids = [ad["ad_id"] for ad in data["ads"]]
    assert len(ids) == k == len(set(ids)) and set(ids) <= catalog
    scores = [ad["score"] for ad in data["ads"]]
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 < ad["pctr"] < 1.0 and ad["bid"] > 0 for ad in data["ads"])
    assert data["model_version"] == tiny_run["export"]["version"]


def test_unknown_user_gets_recommendations_not_an_error(app_url, catalog):
    answer = httpx.post(f"{app_url}/recommend", json={"user_id": "someone-new", "k": 5}, timeout=30)
    assert answer.status_code == 200
    assert len({ad["ad_id"] for ad in answer.json()["ads"]} & catalog) == 5


def test_recent_clicks_in_the_request_change_the_ranking(app_url, tiny_run):
    # Two different known ads as the only history: the user tower must see which ones.
    known = FeatureMap.load(Path(tiny_run["export"]["model_dir"]) / "feature_map.json").vocabularies["ad_id"].values
    one = httpx.post(f"{app_url}/recommend", json={"user_id": "someone-new", "k": 10, "recent_ad_ids": [known[0]]}, timeout=30)
    other = httpx.post(f"{app_url}/recommend", json={"user_id": "someone-new", "k": 10, "recent_ad_ids": [known[1]]}, timeout=30)
    assert [a["score"] for a in one.json()["ads"]] != [a["score"] for a in other.json()["ads"]]


def test_history_shapes_the_ranking_at_all(app_url, catalog):
    ads = sorted(catalog)[:3]
    plain = httpx.post(f"{app_url}/recommend", json={"user_id": "someone-new", "k": 10}, timeout=30).json()
    primed = httpx.post(f"{app_url}/recommend", json={"user_id": "someone-new", "k": 10, "recent_ad_ids": ads}, timeout=30).json()
    assert [a["score"] for a in plain["ads"]] != [a["score"] for a in primed["ads"]]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"k": 5}, "user_id"),
        ({"user_id": "", "k": 5}, "user_id"),
        ({"user_id": "u1", "k": "ten"}, "k"),
        ({"user_id": "u1", "k": 0}, "k"),
        ({"user_id": "u1", "k": MAX_K + 1}, "k"),
        ({"user_id": "u1", "recent_ad_ids": ["a1"] * 6}, "recent_ad_ids"),
        ({"user_id": "u1", "context": "top"}, "context"),
        ({"user_id": "u" * 300}, "user_id"),
        ({"user_id": "u1", "recent_ad_ids": ["a" * 300]}, "recent_ad_ids"),
        ({"user_id": "u1", "context": {f"key{i}": "v" for i in range(17)}}, "context"),
        ({"user_id": "u1", "topk": 3}, "topk"),
        ({"user_id": "u1", "context": {"devise": "mobile"}}, "devise"),
        ({"user_id": "u1", "attributes": {"age": "30"}}, "age"),
    ],
)
def test_malformed_requests_get_422_naming_the_field(app_url, body, field):
    answer = httpx.post(f"{app_url}/recommend", json=body, timeout=30)
    assert answer.status_code == 422
    assert any(field in error["loc"] for error in answer.json()["detail"])


def test_body_that_is_not_json_gets_422(app_url):
    answer = httpx.post(f"{app_url}/recommend", content=b"{not json", headers={"content-type": "application/json"}, timeout=30)
    assert answer.status_code == 422


def test_serve_config_yaml_is_a_valid_app():
    config = yaml.safe_load((Path(__file__).parents[1] / "serve" / "config.yaml").read_text())
    (app,) = config["applications"]
    assert app["import_path"] == "serve.app:build_app"
    AppArgs(**app["args"])  # unknown keys are errors, so a typo in the YAML fails here
    with pytest.raises(ValueError, match="max_replica"):
        AppArgs(**{**app["args"], "user_encoder": {"max_replica": 3}})
    with pytest.raises(ValueError, match="above max_replicas"):
        AppArgs(**{**app["args"], "user_encoder": {"min_replicas": 3, "max_replicas": 1}})


def test_feature_builder_merges_request_and_stored_history(tiny_run):
    model = ServingModel.load(tiny_run["export"]["model_dir"])
    user = known_user(tiny_run)
    stored = model.features.store.history[model.features.store.row(user)]
    recent_ad = model.index.ad_ids[0]
    features = model.features.build([UserQuery(user, recent_ad_ids=[recent_ad]), UserQuery("someone-new")])
    length = features["history_len"][0]
    expected = ([recent_ad] + stored)[: features["history"].shape[1]]
    encoded = model.features.feature_map.vocabularies["ad_id"].encode(pa.array(expected))
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
