"""Models: the two-tower retrieval model, its towers and sequence encoders."""

from __future__ import annotations

from hydra.utils import instantiate
from torch import nn

from adrec.features import FeatureMap


def build_model(model_config: dict, feature_map: FeatureMap) -> tuple[nn.Module, dict]:
    """Build the ``model`` config (a Hydra ``_target_`` partial) for ``feature_map``.

    Returns the model and the config's ``loss`` section, which the training loop reads.
    """
    options = dict(model_config)
    loss = options.pop("loss", None) or {}
    return instantiate(options, _convert_="all")(feature_map), loss
