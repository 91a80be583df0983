"""Every config composes, resolves, and builds a working model."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from adrec.data.options import DataOptions, feature_specs
from adrec.features import FeatureMap, Vocabulary
from adrec.models import build_model
from adrec.models.components import ConfigError
from tests.conftest import CONF, compose_config


def feature_map_and_batch(cfg, rows: int = 7) -> tuple[FeatureMap, dict]:
    """A feature map with 4-value vocabularies for ``cfg``'s dataset, and a random batch of its ids (values for dense ones)."""
    specs = feature_specs(DataOptions.parse(cfg.data))
    fm = FeatureMap(specs, {s.vocabulary: Vocabulary([f"v{i}" for i in range(4)]) for s in specs if s.vocabulary})

    def ids(s):
        return torch.randint(0, fm.cardinality(s.name), (rows, s.max_len) if s.kind == "sequence" else (rows,))

    batch = {s.name: torch.rand(rows) if s.kind == "dense" else ids(s) for s in specs}
    return fm, batch


def test_default_config_composes_resolves_and_builds_the_two_tower_model(tmp_path):
    cfg = compose_config(tmp_path)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["paths"]["prepared_dir"] == f"{tmp_path}/prepared"
    assert {"data", "model", "trainer", "serve", "paths"} <= set(resolved)

    fm, batch = feature_map_and_batch(cfg)
    model, loss = build_model(OmegaConf.to_container(cfg.model, resolve=True), fm)
    model.eval()
    assert loss.bce_weight == 1.0 and loss.softmax_weight == 0.0
    assert model(batch).shape == (7,)
    assert model.user_tower(batch).shape == (7, cfg.model.output_dim)


@pytest.mark.parametrize("dataset", ["synthetic", "criteo", "movielens"])
def test_every_dataset_config_composes(tmp_path, dataset):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(
            "config", overrides=[f"run_dir={tmp_path}", f"data={dataset}", "data.path=/data"] if dataset != "synthetic" else [f"run_dir={tmp_path}"]
        )
    OmegaConf.to_container(cfg.data, resolve=True)
    assert feature_specs(DataOptions.parse(cfg.data))


@pytest.mark.parametrize("encoder", ["mlp", "cnn", "gru", "attention"])
def test_every_user_encoder_config_builds_a_working_model(tmp_path, encoder):
    cfg = compose_config(tmp_path, f"model/user_encoder={encoder}")
    fm, batch = feature_map_and_batch(cfg)
    model, _ = build_model(OmegaConf.to_container(cfg.model, resolve=True), fm)
    assert torch.isfinite(model.eval()(batch)).all()
    assert model.user_tower.config["encoder"]["kind"] == encoder


def test_dcn_config_builds_a_ranker_that_rebuilds_from_its_checkpoint(tmp_path):
    from adrec.registry import load_checkpoint, save_checkpoint

    cfg = compose_config(tmp_path, "model=dcn")
    fm, batch = feature_map_and_batch(cfg)
    fm.save(tmp_path / "fm.json")
    model, _ = build_model(OmegaConf.to_container(cfg.model, resolve=True), fm)
    assert set(model.history) == {"history", "history_category"}
    save_checkpoint(model, tmp_path / "ckpt", tmp_path / "fm.json")
    assert torch.allclose(load_checkpoint(tmp_path / "ckpt")(batch), model.eval()(batch))


def test_a_misspelled_encoder_option_is_an_error_naming_it(tmp_path):
    from hydra.errors import ConfigCompositionException

    # Without `+` Hydra's struct check refuses the key at compose time; with it (or from an experiment
    # overlay, or a stored config) the key reaches the model, which must refuse it instead of ignoring it.
    with pytest.raises(ConfigCompositionException, match="head"):
        compose_config(tmp_path, "model/user_encoder=attention", "model.user_encoder.head=4")
    cfg = compose_config(tmp_path, "model/user_encoder=attention", "+model.user_encoder.head=4")
    fm, _ = feature_map_and_batch(cfg)
    with pytest.raises(
        ConfigError,
        match=r"model\.user_encoder\.head is not an option of adrec\.models\.sequence\.AttentionEncoderOptions "
        r"\(did you mean model\.user_encoder\.heads\?\); known: heads, layers, dropout",
    ):
        build_model(cfg.model, fm)

    spelled = compose_config(tmp_path, "model/user_encoder=attention", "model.user_encoder.heads=4")
    model, _ = build_model(spelled.model, fm)
    assert model.user_tower.config["encoder"] == {"kind": "attention", "heads": 4, "layers": 1, "dropout": 0.1}
    assert model.user_tower.sequence_encoder.encoder.layers[0].self_attn.num_heads == 4


@pytest.mark.parametrize(
    "model, typo, meant",
    [("two_tower", "+model.hiden_dims=[8]", "hidden_dims"), ("dcn", "+model.cross_layer=3", "cross_layers")],
)
def test_a_misspelled_model_option_is_an_error_naming_it(tmp_path, model, typo, meant):
    cfg = compose_config(tmp_path, f"model={model}", typo)
    fm, _ = feature_map_and_batch(cfg)
    key = typo[1:].split("=")[0]
    builder = {"two_tower": "two_tower.build_two_tower", "dcn": "ranker.build_dcn"}[model]
    message = rf"{key} is not an option of adrec\.models\.{builder} \(did you mean model\.{meant}\?\); known: .*\b{meant}\b"
    with pytest.raises(ConfigError, match=message):
        build_model(cfg.model, fm)


def test_a_misspelled_or_mistyped_loss_option_is_an_error_naming_it(tmp_path):
    cfg = compose_config(tmp_path, "+model.loss.softmax_wieght=1.0")
    fm, _ = feature_map_and_batch(cfg)
    with pytest.raises(
        ConfigError,
        match=r"model\.loss\.softmax_wieght is not an option of adrec\.train\.losses\.LossConfig "
        r"\(did you mean model\.loss\.softmax_weight\?\); known: bce_weight, softmax_weight, ",
    ):
        build_model(cfg.model, fm)
    with pytest.raises(ConfigError, match=r"model\.loss\.uniform_negatives='many': expected int"):
        build_model(compose_config(tmp_path, "model.loss.uniform_negatives=many").model, fm)
    _, loss = build_model(compose_config(tmp_path, "model.loss.softmax_weight=1", "model.loss.uniform_negatives=64").model, fm)
    assert loss.softmax_weight == 1.0 and isinstance(loss.softmax_weight, float) and loss.uniform_negatives == 64


def test_only_adrecs_own_components_can_be_built(tmp_path):
    # Retraining builds the model config an exported model's manifest stores: it must not run what a file names.
    fm, _ = feature_map_and_batch(compose_config(tmp_path))
    for target in ("os.system", "adrec.runtime.write_json"):
        with pytest.raises(ConfigError, match=rf"model\._target_='{target}' is not one of adrec's components; .*build_two_tower"):
            build_model({"_target_": target, "_partial_": True, "command": "touch pwned"}, fm)
    stored = OmegaConf.to_container(compose_config(tmp_path).model, resolve=True)
    stored["user_encoder"] = {"_target_": "subprocess.run", "args": ["touch", "pwned"]}
    with pytest.raises(ConfigError, match=r"model\.user_encoder\._target_='subprocess\.run' is not one of adrec's components"):
        build_model(stored, fm)


def test_a_checkpoint_builds_only_adrecs_own_models_and_encoders(tmp_path):
    import json

    from adrec.registry import ArtifactError, load_checkpoint, save_checkpoint, write_manifest

    cfg = compose_config(tmp_path, "model/user_encoder=gru")
    fm, batch = feature_map_and_batch(cfg)
    fm.save(tmp_path / "fm.json")
    model, _ = build_model(cfg.model, fm)
    save_checkpoint(model, tmp_path / "ckpt", tmp_path / "fm.json")
    stored = json.loads((tmp_path / "ckpt" / "model.json").read_text())
    assert stored["user_tower"]["encoder"] == {"kind": "gru", "hidden": 32}  # by kind, never by class path
    assert torch.allclose(load_checkpoint(tmp_path / "ckpt")(batch), model.eval()(batch))

    def tampered(change) -> None:
        edited = json.loads(json.dumps(stored))
        change(edited)
        (tmp_path / "ckpt" / "model.json").write_text(json.dumps(edited))
        write_manifest(tmp_path / "ckpt")  # consistent checksums: only what the files say is wrong

    tampered(lambda c: c["user_tower"]["encoder"].update({"_target_": "os.system"}))
    with pytest.raises(ArtifactError, match=r"encoder\._target_ is not an option of adrec\.models\.sequence\.GRUEncoderOptions"):
        load_checkpoint(tmp_path / "ckpt")
    tampered(lambda c: c["user_tower"]["encoder"].update({"kind": "os.system"}))
    with pytest.raises(ArtifactError, match=r"user encoder kind 'os\.system' is not one of mlp, cnn, gru, attention"):
        load_checkpoint(tmp_path / "ckpt")
    tampered(lambda c: c.update({"kind": "subprocess.run"}))
    with pytest.raises(ArtifactError, match=r"kind 'subprocess\.run'; this adrec version builds only two_tower, dcn"):
        load_checkpoint(tmp_path / "ckpt")


@pytest.mark.parametrize("encoder", ["mlp", "cnn", "gru", "attention"])
def test_a_selection_candidate_is_the_encoders_own_config(tmp_path, encoder):
    """select builds candidates from the encoder classes; the YAML of each lists the same values,
    so one cannot drift from the other."""
    from adrec.train.select import candidate_model

    cfg = compose_config(tmp_path)
    candidate = candidate_model(OmegaConf.to_container(cfg.model, resolve=True), encoder)
    chosen = compose_config(tmp_path, f"model/user_encoder={encoder}")
    assert candidate == OmegaConf.to_container(chosen.model, resolve=True)
    fm, _ = feature_map_and_batch(cfg)
    assert build_model(candidate, fm)[0].user_tower.config["encoder"]["kind"] == encoder


def test_an_unknown_selection_candidate_lists_the_encoders(tmp_path):
    from adrec.train.select import candidate_model

    with pytest.raises(ValueError, match=r"select\.encoders names 'lstm'; the user encoders are \['attention', 'cnn', 'gru', 'mlp'\]"):
        candidate_model(OmegaConf.to_container(compose_config(tmp_path).model, resolve=True), "lstm")


@pytest.mark.parametrize("experiment", ["movielens", "criteo"])
def test_each_experiment_composes_its_tuned_settings_and_builds_its_model(tmp_path, monkeypatch, experiment):
    from hydra import compose, initialize_config_dir

    monkeypatch.setenv("ADREC_SHARED_DATA", "/shared/data")
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=[f"run_dir={tmp_path}", f"experiment={experiment}"])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["data"]["name"] == experiment and resolved["run_dir"] == str(tmp_path)
    tuned = {
        "movielens": {
            "data.path": "/shared/data/movielens-100k",
            "data.label_rule.implicit": True,
            "data.prepare.min_count": 1,
            "data.prepare.history_scope": "user",
            "data.prepare.history_length": 256,
            "model._target_": "adrec.models.two_tower.build_two_tower",
            "model.normalize": True,
            "model.temperature": 0.3,
            "model.item_bias": True,
            "model.hidden_dims": [],
            "model.embedding_dim": 64,
            "model.output_dim": 64,
            "model.oov_dropout": 0.0,
            "model.loss.bce_weight": 0.0,
            "model.loss.softmax_weight": 1.0,
            "trainer.validation_ranking_k": 10,
            "trainer.select_metric": "val_ndcg@10",
            "trainer.select_mode": "max",
            "trainer.batch_size": 512,
            "trainer.lr": 0.01,
            "trainer.embedding_l2": 0.00003,
            "trainer.epochs": 30,
            "trainer.early_stopping_patience": 3,
            "trainer.lr_decay_patience": 2,
        },
        "criteo": {
            "data.path": "/shared/data/criteo-dac-8k",
            "data.prepare.split.kind": "kfold",
            "model._target_": "adrec.models.ranker.build_dcn",
            "model.wide": True,
            "model.wide_l2": 10.0,
            "model.deep_min_count": 10,
            "trainer.batch_size": 256,
            "trainer.epochs": 20,
            "trainer.early_stopping_patience": 3,
            "trainer.lr": 0.01,
            "trainer.embedding_l2": 0.0003,
            "trainer.select_metric": "val_logloss",
            "trainer.select_mode": "min",
        },
    }[experiment]
    overlay = Path(CONF) / "experiment" / "tuned" / f"{experiment}.yaml"  # jobs/tune.py's values win over the experiment's
    if overlay.exists():
        searched = OmegaConf.load(overlay)
        tuned |= {f"{group}.{key}": value for group in searched for key, value in searched[group].items()}
    assert {key: OmegaConf.select(cfg, key) for key in tuned} == tuned
    assert cfg.data.label_rule.at_least == 4 if experiment == "movielens" else cfg.data.prepare.split.folds == 5  # the rest as before

    fm, batch = feature_map_and_batch(cfg)
    model, loss = build_model(cfg.model, fm)
    assert model.eval()(batch).shape == (7,) and torch.isfinite(model(batch)).all()
    assert loss.softmax_weight == (1.0 if experiment == "movielens" else 0.0)
