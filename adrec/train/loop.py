"""The Ray Train worker loop: pure steps, one report (metrics + checkpoint) per epoch."""

from __future__ import annotations

import tempfile
import time

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from hydra.utils import instantiate
from torch import nn

from adrec.eval.metrics import auc, logloss
from adrec.features import FeatureMap
from adrec.registry import save_checkpoint


def train_step(model: nn.Module, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> float:
    """One BCE step on a batch of impressions (label: clicked = 1); returns the loss."""
    logits = model(batch)
    loss = nn.functional.binary_cross_entropy_with_logits(logits, batch["label"])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def predict(model: nn.Module, batches) -> tuple[np.ndarray, np.ndarray]:
    """(pCTR, label) arrays over ``batches``, both (N,)."""
    model.eval()
    probs, labels = [], []
    for batch in batches:
        probs.append(torch.sigmoid(model(batch)).cpu().numpy())
        labels.append(batch["label"].cpu().numpy())
    model.train()
    if not probs:
        return np.empty(0, np.float32), np.empty(0, np.float32)
    return np.concatenate(probs), np.concatenate(labels)


def _gather(array: np.ndarray) -> np.ndarray:
    """Concatenate an array across all workers (identity with one worker)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return array
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, array)
    return np.concatenate(parts)


def train_loop_per_worker(config: dict) -> dict:
    """Train the two-tower model on this worker's shard of ``train``; validate on ``validation``.

    ``config`` is a plain dict (paths already absolute): seed, feature_map, model (a
    Hydra ``_target_`` dict), batch_size, epochs, lr, weight_decay, shuffle_buffer.
    """
    torch.manual_seed(config["seed"])
    context = ray.train.get_context()
    feature_map = FeatureMap.load(config["feature_map"])
    model = instantiate(config["model"])(feature_map)
    model = ray.train.torch.prepare_model(model)
    bare = getattr(model, "module", model)  # DDP wraps only when world size > 1
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    device = ray.train.torch.get_device()
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("validation")

    history: list[dict] = []
    for epoch in range(config["epochs"]):
        started, seen, loss_sum, steps = time.perf_counter(), 0, 0.0, 0
        for batch in train_shard.iter_torch_batches(
            batch_size=config["batch_size"], local_shuffle_buffer_size=config["shuffle_buffer"], device=device
        ):
            loss_sum += train_step(model, batch, optimizer)
            seen += len(batch["label"])
            steps += 1
        seconds = time.perf_counter() - started
        probs, labels = predict(model, val_shard.iter_torch_batches(batch_size=8192, device=device))
        probs, labels = _gather(probs), _gather(labels)
        metrics = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(steps, 1),
            "val_auc": auc(labels, probs),
            "val_logloss": logloss(labels, probs),
            "samples_per_s": seen * context.get_world_size() / max(seconds, 1e-9),
        }
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if context.get_world_rank() == 0:
                save_checkpoint(bare, tmp, config["feature_map"], epoch=epoch + 1, metrics=metrics)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)
        history.append(metrics)
    return {"epochs": history}
