"""Models: the two-tower retrieval model, its towers and sequence encoders, and the DCN ranker."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf
from torch import nn

from adrec.features import FeatureMap
from adrec.models.components import instantiate

if TYPE_CHECKING:
    from adrec.train.losses import LossConfig


def build_model(model_config: Mapping, feature_map: FeatureMap) -> tuple[nn.Module, LossConfig]:
    """Build the ``model`` config (a ``_target_`` builder with ``_partial_: true``) for ``feature_map``.

    Returns the model and the config's ``loss`` section as a LossConfig, which the training loop
    reads. Raises ConfigError (a ValueError) naming any unknown or missing option, at any depth,
    and any target that is not one of adrec's components (adrec.models.components).
    """
    # adrec.train.losses imports adrec.models.components, hence here and not at the top.
    from adrec.train.losses import LossConfig

    if isinstance(model_config, DictConfig):
        model_config = OmegaConf.to_container(model_config, resolve=True)
    options = dict(model_config)
    loss = LossConfig.from_dict(options.pop("loss", None))
    return instantiate(options, "model")(feature_map), loss
