import pyarrow as pa
import pytest

from adrec.features import OOV, PAD, FeatureMap, FeatureSpec, Vocabulary, encode_sequence


def test_vocabulary_keeps_frequent_values_and_maps_the_rest_to_oov():
    vocab = Vocabulary.fit({"a": 5, "b": 2, "c": 1, "d": 2}, min_count=2)
    assert vocab.values == ["a", "b", "d"]  # by count, then value
    assert vocab.cardinality == 5  # PAD + OOV + 3
    encoded = vocab.encode(pa.array(["a", "c", None, "d", "zzz"]))
    assert encoded.tolist() == [2, OOV, OOV, 4, OOV]


def test_sequences_are_right_padded_and_truncated():
    vocab = Vocabulary(values=["x", "y"])
    ids, lengths = encode_sequence(pa.array([["y", "x", "q"], [], None, ["x"] * 5]), vocab, max_len=3)
    assert ids.tolist() == [[3, 2, OOV], [PAD] * 3, [PAD] * 3, [2, 2, 2]]
    assert lengths.tolist() == [3, 0, 0, 3]


def test_feature_map_round_trips_through_json(tmp_path):
    fm = FeatureMap(
        [FeatureSpec("ad_id", "ad", "categorical", "ad_id"), FeatureSpec("history", "user", "sequence", "ad_id", 4)],
        {"ad_id": Vocabulary(["a1", "a2"], min_count=2)},
        metadata={"note": 1},
    )
    fm.save(tmp_path / "fm.json")
    loaded = FeatureMap.load(tmp_path / "fm.json")
    assert loaded == fm
    out = loaded.encode(pa.table({"ad_id": ["a2", "nope"], "history": [["a1"], ["a2", "a1"]]}))
    assert out["ad_id"].tolist() == [3, OOV]
    assert out["history"].tolist() == [[2, 0, 0, 0], [3, 2, 0, 0]]
    assert loaded.cardinality("history") == 4


def test_feature_map_rejects_foreign_json():
    with pytest.raises(ValueError, match="not an adrec feature map"):
        FeatureMap.from_json({"format": "something-else"})
