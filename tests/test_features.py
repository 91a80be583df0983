import numpy as np
import pyarrow as pa
import pytest
import torch

from adrec.features import OOV, PAD, FeatureMap, FeatureSpec, Vocabulary, encode_sequence


def test_vocabulary_keeps_frequent_values_and_maps_the_rest_to_oov():
    vocab = Vocabulary.fit({"a": 5, "b": 2, "c": 1, "d": 2}, min_count=2)
    assert vocab.values == ["a", "b", "d"]  # by count, then value
    assert vocab.cardinality == 5  # PAD + OOV + 3
    encoded = vocab.encode(pa.array(["a", "c", None, "d", "zzz"]))
    assert encoded.tolist() == [2, OOV, OOV, 4, OOV]


def test_sequences_are_right_padded_and_truncated():
    vocab = Vocabulary(values=["x", "y"])
    ids, lengths = encode_sequence(pa.array([["y", "x", "q"], [], None, ["x"] * 5]), vocab.encode, max_len=3)
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


def test_hashing_is_stable_and_bounded():
    from adrec.features import hash_ids, stable_hash

    # FNV-1a 64 of "a", as published: the same on every machine, so serving matches training.
    assert stable_hash(pa.array(["a"]))[0] == 0xAF63DC4C8601EC8C
    ids = hash_ids(pa.array(["x", "y", None, "x"]), buckets=7)
    assert ids[0] == ids[3] and ids[2] == OOV and ((ids >= 2) & (ids < 9) | (ids == OOV)).all()


def test_text_becomes_a_bag_of_hashed_words():
    from adrec.features import tokenize

    assert tokenize(pa.array(["Star Wars: Episode IV", None, ""])).to_pylist() == [["star", "wars", "episode", "iv"], [], []]
    fm = FeatureMap([FeatureSpec("title", "ad", "sequence", None, 3, hash_buckets=50, tokenize=True)], {})
    out = fm.encode(pa.table({"title": ["Star wars", "WARS star!"]}))
    assert sorted(out["title"][0][:2]) == sorted(out["title"][1][:2]) and out["title_len"].tolist() == [2, 2]


def test_numbers_become_log_values_and_quantile_buckets():
    fm = FeatureMap(
        [FeatureSpec("I1", "context", "dense", log1p=True), FeatureSpec("I1_q", "context", "bucket", boundaries=(1.0, 10.0), source="I1")],
        {},
    )
    out = fm.encode(pa.table({"I1": ["0", "5", "100", None, "-3"]}))
    assert out["I1_q"].tolist() == [2, 3, 4, OOV, 2]
    assert out["I1"].tolist() == pytest.approx([0.0, np.log1p(5), np.log1p(100), 0.0, -np.log1p(3)])
    assert fm.cardinality("I1_q") == 5


def test_model_inputs_keep_dense_values_as_floats():
    # Evaluation once cast every input to int64, truncating dense features (Criteo's I1-I13) it was trained on as floats.
    from adrec.inference import to_features

    table = pa.table({"ad_id": pa.array([3, 4]), "I1": pa.array([0.69, 2.5], pa.float32())})
    for batch in (table, {"ad_id": np.array([3, 4]), "I1": np.array([0.69, 2.5], np.float32)}):
        out = to_features(batch, ["ad_id", "I1"])
        assert out["ad_id"].dtype == torch.int64 and out["I1"].dtype == torch.float32
        assert torch.allclose(out["I1"], torch.tensor([0.69, 2.5]))


def compose_plain(tmp_path, *overrides: str):
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONF

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=[f"run_dir={tmp_path}", *overrides])


def plain_data(tmp_path, *overrides: str) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(compose_plain(tmp_path, *overrides).data, resolve=True)


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "+data.users.features.gender.min_cout=3",
            r"data\.users\.features\.gender: unknown option 'min_cout' \(did you mean 'min_count'\?\); known: kind, group",
        ),
        ("+data.prepare.min_cout=3", r"data\.prepare: unknown option 'min_cout' \(did you mean 'min_count'\?\); known: history_length"),
        ("+data.prepare.split.cutof_ms=[1,2]", r"data\.prepare\.split: unknown option 'cutof_ms'"),
        ("+data.users.features.gender.quantiles=4", r"data\.users\.features\.gender: quantiles applies to kind numeric, not categorical"),
    ],
)
def test_a_misspelt_data_option_is_an_error_naming_it_before_any_work(tmp_path, override, message):
    # Options were read with .get, so a typo was silently ignored (the default used instead).
    from adrec.data.prepare import prepare

    with pytest.raises(ValueError, match=message):
        prepare(plain_data(tmp_path, override), tmp_path / "prepared", seed=7)
    assert not (tmp_path / "prepared").exists()


def test_prepare_grows_from_a_feature_map_and_overrides_split_keys(tmp_path):
    from adrec.data.options import DataOptions
    from adrec.data.prepare import prepare

    data = plain_data(tmp_path)
    options = DataOptions.parse(data, grow_from=tmp_path / "fm.json", split={"cutoffs_ms": [5, 9], "replay_before_ms": 3, "replay": 0.5})
    assert options.prepare.base_feature_map == str(tmp_path / "fm.json")
    assert (options.prepare.split.kind, options.prepare.split.cutoffs_ms, options.prepare.split.replay_before_ms) == ("time", (5, 9), 3)
    assert options.prepare.split.train == data["prepare"]["split"]["train"]  # keys not overridden stay
    assert DataOptions.parse(plain_data(tmp_path, "data.prepare.base_feature_map=/m/fm.json")).prepare.base_feature_map == "/m/fm.json"
    with pytest.raises(ValueError, match=r"prepare\(split=...\): unknown option 'cutoff_ms'"):
        prepare(data, tmp_path / "prepared", seed=7, split={"cutoff_ms": [5, 9]})


def test_generator_defaults_are_the_synthetic_configs(tmp_path):
    # conf/data/synthetic.yaml is where the generator's values are set; the dataclass must not drift from it.
    from dataclasses import asdict

    from adrec.data.synthetic import GeneratorConfig

    generator = plain_data(tmp_path)["generator"]
    assert generator == asdict(GeneratorConfig())
