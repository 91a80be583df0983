"""Models: the two-tower retrieval model, its towers and sequence encoders, and the DCN ranker."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf
from torch import nn

from adrec.features import FeatureMap
from adrec.models.components import instantiate

if TYPE_CHECKING:
    from adrec.train.losses import LossConfig


def model_builder(model_config: Mapping) -> tuple[Callable[[FeatureMap], nn.Module], LossConfig]:
    """The checked builder of the ``model`` config (a ``_target_`` builder with ``_partial_: true``)
    and its ``loss`` section as a LossConfig, which the training loop reads.

    Raises ConfigError (a ValueError) naming any unknown or missing option, at any depth, and any
    target that is not one of adrec's components (adrec.models.components). Builds no tables, so
    the driver checks a config here before any worker starts.
    """
    # adrec.train.losses imports adrec.models.components, hence here and not at the top.
    from adrec.train.losses import LossConfig

    if isinstance(model_config, DictConfig):
        model_config = OmegaConf.to_container(model_config, resolve=True)
    options = dict(model_config)
    loss = LossConfig.from_dict(options.pop("loss", None))
    return instantiate(options, "model"), loss


def build_model(model_config: Mapping, feature_map: FeatureMap) -> tuple[nn.Module, LossConfig]:
    """The model of ``model_config`` for ``feature_map``, and its LossConfig (see ``model_builder``)."""
    builder, loss = model_builder(model_config)
    return builder(feature_map), loss
