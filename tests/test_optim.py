"""Sparse id tables: row-wise gradients and updates; bf16 autocast; learning-rate scaling."""

import pytest
import torch

from adrec.models.towers import EmbeddingMLPTower
from adrec.train.driver import scaled_lr
from adrec.train.loop import autocast_for
from adrec.train.optim import build_optimizer


def tower(sparse: bool) -> EmbeddingMLPTower:
    torch.manual_seed(0)
    return EmbeddingMLPTower({"ad_id": 100_000}, {"tokens": 1000}, 8, [16], 4, dense=["price"], sparse=sparse)


def batch() -> dict[str, torch.Tensor]:
    return {"ad_id": torch.tensor([3, 7, 7]), "tokens": torch.tensor([[1, 2], [2, 0], [5, 0]]), "price": torch.tensor([1.0, 2.0, 3.0])}


def test_sparse_tables_update_only_the_rows_a_batch_touched():
    model = tower(sparse=True)
    optimizer = build_optimizer(model, lr=0.1, weight_decay=0.01)
    before = model.embeddings["ad_id"].weight.detach().clone()
    model(batch()).sum().backward()

    grad = model.embeddings["ad_id"].weight.grad
    assert grad.is_sparse and sorted(grad.coalesce().indices()[0].tolist()) == [3, 7]
    assert set(optimizer.optimizers) == {"dense", "sparse"}
    optimizer.step()
    changed = (model.embeddings["ad_id"].weight.detach() != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == [3, 7]
    assert not model.mlp[0].weight.grad.is_sparse  # the MLP stays dense (Adam with weight decay)


def test_sparse_and_dense_tables_take_the_same_first_step():
    # Adam and SparseAdam agree on a first step for the rows a batch touches.
    dense, sparse = tower(sparse=False), tower(sparse=True)
    for model in (dense, sparse):
        optimizer = build_optimizer(model, lr=0.01, weight_decay=0.0)
        model(batch()).sum().backward()
        optimizer.step()
    rows = torch.tensor([3, 7])
    assert torch.allclose(dense.embeddings["ad_id"].weight[rows], sparse.embeddings["ad_id"].weight[rows], atol=1e-6)


def test_embedding_tables_and_dense_weights_take_their_own_l2():
    # No loss gradient: a step moves each weight only by its own L2, so a zero L2 leaves it in place.
    model = tower(sparse=False)
    tables_only = build_optimizer(model, lr=0.1, weight_decay=0.0, embedding_l2=1.0)
    table, dense = model.embeddings["ad_id"].weight.detach().clone(), model.mlp[0].weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    tables_only.step()
    assert not torch.equal(model.embeddings["ad_id"].weight, table)
    assert torch.equal(model.mlp[0].weight, dense)
    tables_only.scale_lr(0.5)
    assert tables_only.lr == pytest.approx(0.05)


def test_sparse_tables_take_the_embedding_l2_on_the_rows_a_batch_touched():
    # On the rows a batch touched, a sparse table's step (L2 included) is a dense table's; the rows
    # it did not touch stay put, where a dense table decays them too.
    dense, sparse = tower(sparse=False), tower(sparse=True)
    for model in (dense, sparse):
        optimizer = build_optimizer(model, lr=0.01, weight_decay=0.0, embedding_l2=0.5)
        model(batch()).sum().backward()
        optimizer.step()
    rows = torch.tensor([3, 7])
    assert torch.allclose(dense.embeddings["ad_id"].weight[rows], sparse.embeddings["ad_id"].weight[rows], atol=1e-6)
    untouched = torch.tensor([0, 4, 99_999])
    assert torch.equal(sparse.embeddings["ad_id"].weight[untouched], tower(sparse=True).embeddings["ad_id"].weight[untouched])
    assert not torch.equal(dense.embeddings["ad_id"].weight[untouched], tower(sparse=False).embeddings["ad_id"].weight[untouched])


def test_optimizer_state_round_trips_and_rejects_a_different_layout():
    model = tower(sparse=True)
    optimizer = build_optimizer(model, lr=0.1, weight_decay=0.0)
    model(batch()).sum().backward()
    optimizer.step()
    state = optimizer.state_dict()
    build_optimizer(tower(sparse=True), lr=0.1, weight_decay=0.0).load_state_dict(state)
    with pytest.raises(ValueError, match="sparse_embeddings"):
        build_optimizer(tower(sparse=False), lr=0.1, weight_decay=0.0).load_state_dict(state)


def test_bf16_autocast_runs_the_tower_in_bfloat16():
    model = tower(sparse=False)
    with autocast_for("bf16", torch.device("cpu"))():
        out = model(batch())
    assert out.dtype == torch.bfloat16
    with autocast_for("auto", torch.device("cpu"))():  # auto: fp32 on CPU
        assert model(batch()).dtype == torch.float32
    with pytest.raises(ValueError, match="trainer.precision"):
        autocast_for("fp16", torch.device("cpu"))


def test_learning_rate_scales_with_the_global_batch():
    assert scaled_lr(0.01, "linear", 4) == pytest.approx(0.04)
    assert scaled_lr(0.01, "sqrt", 4) == pytest.approx(0.02)
    assert scaled_lr(0.01, "none", 4) == 0.01
    with pytest.raises(ValueError, match="lr_scaling"):
        scaled_lr(0.01, "cubic", 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: checks bf16 autocast on the GPU path")
def test_bf16_on_gpu_trains_a_step():
    device = torch.device("cuda")
    model = tower(sparse=True).to(device)
    optimizer = build_optimizer(model, lr=0.01, weight_decay=0.0)
    with autocast_for("auto", device)():
        loss = model({k: v.to(device) for k, v in batch().items()}).float().sum()
    loss.backward()
    optimizer.step()
    assert torch.isfinite(model.embeddings["ad_id"].weight).all()
