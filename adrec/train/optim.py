"""Optimizers for models whose id tables may have sparse gradients, with L2 set apart for id tables.

Embedding tables and dense weights get separate L2 (``embedding_l2``, ``weight_decay``): an id
row is updated only when its id appears, so the strength that keeps rare ids from memorising
their few clicks is not the one that suits a shared dense layer.

A sparse embedding (``nn.Embedding(sparse=True)``) yields a gradient holding only the rows the
batch touched; DDP exchanges those rows (indices + values) instead of all-reducing the whole
table, and ``SparseAdam`` updates only them. Everything else trains with dense Adam.
"""

from __future__ import annotations

import torch
from torch import nn


def embedding_tables(model: nn.Module) -> list[nn.Module]:
    """Every id table of ``model`` (``nn.Embedding`` and ``nn.EmbeddingBag``)."""
    return [m for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))]


def sparse_parameters(model: nn.Module) -> set[int]:
    """ids of the weights of every embedding module built with ``sparse=True``."""
    return {id(m.weight) for m in embedding_tables(model) if m.sparse}


class SparseDenseAdam:
    """Adam for dense parameters plus SparseAdam for sparse id tables, stepped together.

    ``weight_decay`` is the L2 of dense weights, ``embedding_l2`` that of dense id tables (Adam's
    coupled L2: the gradient of (l2 / 2) * ||w||^2 added to each step's). SparseAdam has no weight
    decay: decaying a row would need a dense pass over the table, which is what sparse updates
    avoid, so sparse tables take no L2 (``embedding_l2`` > 0 with one is an error).
    """

    def __init__(self, model: nn.Module, lr: float, weight_decay: float, embedding_l2: float = 0.0) -> None:
        sparse_ids = sparse_parameters(model)
        table_ids = {id(m.weight) for m in embedding_tables(model)}
        params = [p for p in model.parameters() if p.requires_grad]
        dense = [p for p in params if id(p) not in table_ids]
        tables = [p for p in params if id(p) in table_ids and id(p) not in sparse_ids]
        sparse = [p for p in params if id(p) in sparse_ids]
        if sparse and embedding_l2:
            raise ValueError(
                "trainer.embedding_l2 > 0 with sparse id tables: SparseAdam updates only the rows a batch touches "
                "and has no L2; set model.sparse_embeddings=false or trainer.embedding_l2=0"
            )
        groups = [{"params": dense, "weight_decay": weight_decay}, {"params": tables, "weight_decay": embedding_l2}]
        self.optimizers: dict[str, torch.optim.Optimizer] = {"dense": torch.optim.Adam([g for g in groups if g["params"]], lr=lr)}
        if sparse:
            self.optimizers["sparse"] = torch.optim.SparseAdam(sparse, lr=lr)

    @property
    def lr(self) -> float:
        """The current learning rate (every group shares it)."""
        return float(self.optimizers["dense"].param_groups[0]["lr"])

    def scale_lr(self, factor: float) -> None:
        """Multiply every group's learning rate by ``factor`` (decay on a plateau)."""
        for optimizer in self.optimizers.values():
            for group in optimizer.param_groups:
                group["lr"] *= factor

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


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, embedding_l2: float = 0.0) -> SparseDenseAdam:
    """The optimizer for ``model``: dense Adam, plus SparseAdam when it has sparse id tables."""
    return SparseDenseAdam(model, lr, weight_decay, embedding_l2)
