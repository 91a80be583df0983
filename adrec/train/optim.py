"""Optimizers for models whose id tables may have sparse gradients.

A sparse embedding (``nn.Embedding(sparse=True)``) yields a gradient holding only the rows the
batch touched; DDP exchanges those rows (indices + values) instead of all-reducing the whole
table, and ``SparseAdam`` updates only them. Everything else trains with dense Adam.
"""

from __future__ import annotations

import torch
from torch import nn


def sparse_parameters(model: nn.Module) -> set[int]:
    """ids of the weights of every embedding module built with ``sparse=True``."""
    return {id(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse}


class SparseDenseAdam:
    """Adam for dense parameters plus SparseAdam for sparse id tables, stepped together.

    SparseAdam has no weight decay: decaying a row would need a dense pass over the table,
    which is what sparse updates avoid. ``weight_decay`` applies to the dense parameters only.
    """

    def __init__(self, model: nn.Module, lr: float, weight_decay: float) -> None:
        sparse_ids = sparse_parameters(model)
        params = [p for p in model.parameters() if p.requires_grad]
        dense = [p for p in params if id(p) not in sparse_ids]
        sparse = [p for p in params if id(p) in sparse_ids]
        self.optimizers: dict[str, torch.optim.Optimizer] = {"dense": torch.optim.Adam(dense, lr=lr, weight_decay=weight_decay)}
        if sparse:
            self.optimizers["sparse"] = torch.optim.SparseAdam(sparse, lr=lr)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for optimizer in self.optimizers.values():
            optimizer.step()

    def state_dict(self) -> dict:
        return {name: optimizer.state_dict() for name, optimizer in self.optimizers.items()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != set(self.optimizers):
            raise ValueError(
                f"the checkpoint's optimizer holds {sorted(state)} parameter groups and this model needs "
                f"{sorted(self.optimizers)}: was model.sparse_embeddings changed since the checkpoint?"
            )
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state[name])


def build_optimizer(model: nn.Module, lr: float, weight_decay: float) -> SparseDenseAdam:
    """The optimizer for ``model``: dense Adam, plus SparseAdam when it has sparse id tables."""
    return SparseDenseAdam(model, lr, weight_decay)
