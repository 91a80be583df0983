"""Every config composes, resolves, and builds a working model."""

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from adrec.data.prepare import feature_specs
from adrec.features import FeatureMap, Vocabulary
from tests.conftest import compose_config


def test_default_config_composes_resolves_and_builds_the_two_tower_model(tmp_path):
    cfg = compose_config(tmp_path)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["paths"]["prepared_dir"] == f"{tmp_path}/prepared"
    assert {"data", "model", "trainer", "serve", "paths"} <= set(resolved)

    specs = feature_specs(history_length=5, token_length=3)
    fm = FeatureMap(specs, {s.vocabulary: Vocabulary([f"v{i}" for i in range(4)]) for s in specs})
    model = instantiate(cfg.model)(fm).eval()
    batch = {s.name: torch.randint(0, 6, (7, s.max_len) if s.kind == "sequence" else (7,)) for s in specs}
    assert model(batch).shape == (7,)
    assert model.user_tower(batch).shape == (7, cfg.model.output_dim)
