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

    ``weight_decay`` is the L2 of dense weights, ``embedding_l2`` that of id tables (Adam's coupled
    L2: the gradient of (l2 / 2) * ||w||^2 added to each step's). A dense table takes it on every
    row each step; a sparse table on the rows the batch touched (decaying the others would need a
    dense pass over the table, which sparse updates avoid), as FBGEMM's row-wise weight decay does.
    """

    def __init__(self, model: nn.Module, lr: float, weight_decay: float, embedding_l2: float = 0.0) -> None:
        sparse_ids = sparse_parameters(model)
        table_ids = {id(m.weight) for m in embedding_tables(model)}
        params = [p for p in model.parameters() if p.requires_grad]
        dense = [p for p in params if id(p) not in table_ids]
        tables = [p for p in params if id(p) in table_ids and id(p) not in sparse_ids]
        sparse = [p for p in params if id(p) in sparse_ids]
        groups = [{"params": dense, "weight_decay": weight_decay}, {"params": tables, "weight_decay": embedding_l2}]
        self.optimizers: dict[str, torch.optim.Optimizer] = {"dense": torch.optim.Adam([g for g in groups if g["params"]], lr=lr)}
        self.sparse, self.embedding_l2 = sparse, embedding_l2
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
        if self.embedding_l2:
            self._add_touched_rows_l2()
        for optimizer in self.optimizers.values():
            optimizer.step()

    @torch.no_grad()
    def _add_touched_rows_l2(self) -> None:
        """Add embedding_l2 * w to each sparse gradient's rows (the rows its batch touched)."""
        for table in self.sparse:
            if table.grad is None:
                continue
            grad = table.grad.coalesce()
            rows = grad.indices()[0]
            values = grad.values() + self.embedding_l2 * table[rows]
            # The indices are the coalesced gradient's own: valid and unique, so no check or sort is needed.
            table.grad = torch.sparse_coo_tensor(grad.indices(), values, grad.shape, check_invariants=False, is_coalesced=True)

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
