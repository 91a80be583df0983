"""Every config composes, resolves, and builds a working model."""

import torch
from omegaconf import OmegaConf

import pytest

from adrec.data.prepare import event_columns, feature_specs
from adrec.features import FeatureMap, Vocabulary
from adrec.models import build_model
from tests.conftest import CONF, compose_config


def feature_map_and_batch(cfg, rows: int = 7) -> tuple[FeatureMap, dict]:
    """A feature map with 4-value vocabularies for ``cfg``'s dataset, and a random batch of its ids."""
    specs = feature_specs(cfg, event_columns(cfg))
    fm = FeatureMap(specs, {s.vocabulary: Vocabulary([f"v{i}" for i in range(4)]) for s in specs if s.vocabulary})
    batch = {s.name: torch.randint(0, 6, (rows, s.max_len) if s.kind == "sequence" else (rows,)) for s in specs}
    return fm, batch



def test_default_config_composes_resolves_and_builds_the_two_tower_model(tmp_path):
    cfg = compose_config(tmp_path)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["paths"]["prepared_dir"] == f"{tmp_path}/prepared"
    assert {"data", "model", "trainer", "serve", "paths"} <= set(resolved)

    fm, batch = feature_map_and_batch(cfg)
    model, loss = build_model(OmegaConf.to_container(cfg.model, resolve=True), fm)
    model.eval()
    assert loss["bce_weight"] == 1.0
    assert model(batch).shape == (7,)
    assert model.user_tower(batch).shape == (7, cfg.model.output_dim)


@pytest.mark.parametrize("dataset", ["synthetic", "criteo", "movielens"])
def test_every_dataset_config_composes(tmp_path, dataset):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=[f"run_dir={tmp_path}", f"data={dataset}", "data.path=/data"] if dataset != "synthetic"
                      else [f"run_dir={tmp_path}"])
    OmegaConf.to_container(cfg.data, resolve=True)
    assert feature_specs(cfg, event_columns(cfg))


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
