"""The complete check of an online ad update against a feature map, without Ray."""

import numpy as np
import pytest

from adrec.ads import MAX_BID, AdUpdate, AdUpdateError, check_ad_update, encode_ad
from adrec.features import FeatureMap, FeatureSpec, Vocabulary

FEATURE_MAP = FeatureMap(
    features=[
        FeatureSpec("ad_id", "ad", "categorical", vocabulary="ad_id"),
        FeatureSpec("category", "ad", "categorical", vocabulary="category"),
        FeatureSpec("tokens", "ad", "sequence", hash_buckets=64, max_len=4, tokenize=True),
        FeatureSpec("labels", "ad", "sequence", vocabulary="category", max_len=2),
        FeatureSpec("price", "ad", "dense", log1p=True),
        FeatureSpec("device", "context", "categorical", vocabulary="device"),
    ],
    vocabularies={"ad_id": Vocabulary(["a1"]), "category": Vocabulary(["shoes", "hats"]), "device": Vocabulary(["mobile"])},
)
COMPLETE = {"category": "shoes", "tokens": "Red running shoes", "labels": ["hats"], "price": "19.5"}


def problems(**changes) -> dict[str, str]:
    fields = {"ad_id": "new-ad", "campaign_id": "c1", "bid": 1.0, "attributes": COMPLETE} | changes
    return {".".join(map(str, p["loc"])): p["type"] for p in check_ad_update(FEATURE_MAP, AdUpdate(**fields))}


def test_a_complete_ad_encodes_with_the_training_transforms():
    assert problems() == {}
    encoded = encode_ad(FEATURE_MAP, AdUpdate("new-ad", "c1", 1.0, COMPLETE))
    assert encoded["category"].tolist() == [2] and encoded["labels"].tolist() == [[3, 0]]
    assert encoded["tokens"].shape == (1, 4) and encoded["tokens_len"].tolist() == [3]
    assert encoded["price"] == pytest.approx(np.log1p(19.5))
    assert encode_ad(FEATURE_MAP, AdUpdate("new-ad", "c1", 1.0, {**COMPLETE, "tokens": [], "price": 3}))["tokens_len"].tolist() == [0]


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"attributes": {}}, {f"attributes.{name}": "missing" for name in COMPLETE}),
        ({"attributes": {**COMPLETE, "colour": "red"}}, {"attributes.colour": "extra_forbidden"}),
        ({"attributes": {**COMPLETE, "category": ["shoes"]}}, {"attributes.category": "value_error"}),
        ({"attributes": {**COMPLETE, "labels": "hats"}}, {"attributes.labels": "value_error"}),
        ({"attributes": {**COMPLETE, "labels": ["x"] * 65}}, {"attributes.labels": "value_error"}),
        ({"attributes": {**COMPLETE, "price": "cheap"}}, {"attributes.price": "value_error"}),
        ({"attributes": {**COMPLETE, "price": 1e300}}, {"attributes.price": "value_error"}),  # inf as float32
        ({"attributes": {**COMPLETE, "price": True}}, {"attributes.price": "value_error"}),
        ({"attributes": ["not", "a", "dict"]}, {"attributes": "dict_type", **{f"attributes.{name}": "missing" for name in COMPLETE}}),
        ({"bid": 0.0}, {"bid": "value_error"}),
        ({"bid": float("nan")}, {"bid": "value_error"}),
        ({"bid": MAX_BID * 10}, {"bid": "value_error"}),
        ({"bid": True}, {"bid": "value_error"}),
        ({"ad_id": ""}, {"ad_id": "string_type"}),
        ({"campaign_id": "c" * 300}, {"campaign_id": "string_too_long"}),
    ],
)
def test_every_problem_is_named_by_field(changes, expected):
    assert problems(**changes) == expected


def test_encoding_a_bad_ad_raises_with_every_problem():
    with pytest.raises(AdUpdateError, match="attributes.category: missing") as error:
        encode_ad(FEATURE_MAP, AdUpdate("new-ad", "c1", -1.0, {}))
    assert {p["loc"][-1] for p in error.value.problems} == {"bid", *COMPLETE}
