"""The Ray Train worker loop: pure steps, one report (metrics + checkpoint) per epoch.

The loss is ``model.loss`` (adrec.train.losses): BCE on impressions, the in-batch softmax of
the two towers, or a weighted sum of both.
"""

from __future__ import annotations

import tempfile
import time

import numpy as np
import pyarrow.parquet as pq
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from adrec.eval.metrics import auc, logloss
from adrec.features import FeatureMap
from adrec.inference import to_features
from adrec.models import build_model
from adrec.registry import save_checkpoint
from adrec.train.losses import LossConfig, candidate_log_q, in_batch_softmax


class Objective:
    """The configured loss of a batch; holds what the softmax needs (ad frequencies, the catalog)."""

    def __init__(self, loss: LossConfig, feature_map: FeatureMap, catalog_path: str | None, device: torch.device) -> None:
        self.loss = loss
        self.log_frequency = None
        self.catalog: dict[str, torch.Tensor] = {}
        self.catalog_size = 0
        if not loss.softmax_weight:
            return
        if "ad_id" not in {f.name for f in feature_map.features}:
            raise ValueError("model.loss.softmax_weight > 0 needs an ad_id feature (map ad_id in data.events.columns)")
        spec = feature_map.spec("ad_id")
        frequencies = feature_map.vocabularies[spec.vocabulary].frequencies() if spec.vocabulary else None
        if loss.logq_correction and frequencies is not None:
            self.log_frequency = torch.log(torch.from_numpy(frequencies).clamp(min=1e-12)).float().to(device)
        if loss.uniform_negatives:
            if not catalog_path:
                raise ValueError("model.loss.uniform_negatives needs an ad catalog (data.ads)")
            table = pq.read_table(catalog_path)
            self.catalog = {k: v.to(device) for k, v in to_features(table, feature_map.names("ad")).items()}
            self.catalog_size = table.num_rows

    def negatives(self) -> dict[str, torch.Tensor] | None:
        """``uniform_negatives`` catalog rows drawn uniformly, as ad-tower inputs."""
        if not self.catalog:
            return None
        rows = torch.randint(self.catalog_size, (self.loss.uniform_negatives,), device=self.catalog["ad_id"].device)
        return {k: v[rows] for k, v in self.catalog.items()}

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(scalar loss, click logits (B,)) of one batch."""
        loss = self.loss
        if not loss.softmax_weight:
            logits = model(batch)
            return loss.bce_weight * nn.functional.binary_cross_entropy_with_logits(logits, batch["label"]), logits
        negatives = self.negatives()
        logits, user, ad = model(batch, return_embeddings=True, negatives=negatives)
        ad_ids = batch["ad_id"] if negatives is None else torch.cat([batch["ad_id"], negatives["ad_id"]])
        log_q = None
        if self.log_frequency is not None:
            uniform = len(negatives["ad_id"]) if negatives else 0
            log_q = candidate_log_q(ad_ids, self.log_frequency, len(batch["label"]), self.catalog_size, uniform)
        softmax = in_batch_softmax(user, ad, ad_ids, batch["label"] > 0.5, log_q, loss.remove_accidental_hits)
        # The BCE term stays in the graph even at weight 0, so DDP sees the logit bias used.
        bce = nn.functional.binary_cross_entropy_with_logits(logits, batch["label"])
        return loss.softmax_weight * softmax + loss.bce_weight * bce, logits


def train_step(model: nn.Module, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, objective: Objective) -> float:
    """One optimizer step on a batch of examples (label: clicked = 1); returns the loss."""
    loss, _ = objective(model, batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def validate(model: nn.Module, batches, objective: Objective) -> tuple[np.ndarray, np.ndarray, float]:
    """One pass over ``batches``: pCTR (N,), labels (N,) and the mean training objective.

    The objective at the training batch size stays comparable across epochs, and is the
    score to select on for implicit feedback, where AUC is undefined.
    """
    model.eval()
    probs, labels, total = [], [], 0.0
    for batch in batches:
        loss, logits = objective(model, batch)
        total += float(loss) * len(batch["label"])
        probs.append(torch.sigmoid(logits).cpu().numpy())
        labels.append(batch["label"].cpu().numpy())
    model.train()
    if not probs:
        return np.empty(0, np.float32), np.empty(0, np.float32), float("nan")
    probs, labels = np.concatenate(probs), np.concatenate(labels)
    return probs, labels, total / len(labels)


def _gather(array: np.ndarray) -> np.ndarray:
    """Concatenate an array across all workers (identity with one worker)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return array
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, array)
    return np.concatenate(parts)


def train_loop_per_worker(config: dict) -> dict:
    """Train the two-tower model on this worker's shard of ``train``; validate on ``validation``.

    ``config`` is a plain dict (paths already absolute): seed, feature_map, catalog (ads.parquet
    or None), model (a Hydra ``_target_`` dict with a ``loss`` section), batch_size, epochs, lr,
    weight_decay, shuffle_buffer.
    """
    torch.manual_seed(config["seed"])
    context = ray.train.get_context()
    feature_map = FeatureMap.load(config["feature_map"])
    model, loss_options = build_model(config["model"], feature_map)
    loss = LossConfig.from_dict(loss_options)
    model = ray.train.torch.prepare_model(model)
    bare = getattr(model, "module", model)  # DDP wraps only when world size > 1
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    device = ray.train.torch.get_device()
    objective = Objective(loss, feature_map, config.get("catalog"), device)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("validation")

    history: list[dict] = []
    for epoch in range(config["epochs"]):
        started, seen, loss_sum, steps = time.perf_counter(), 0, 0.0, 0
        for batch in train_shard.iter_torch_batches(
            batch_size=config["batch_size"], local_shuffle_buffer_size=config["shuffle_buffer"], device=device
        ):
            loss_sum += train_step(model, batch, optimizer, objective)
            seen += len(batch["label"])
            steps += 1
        seconds = time.perf_counter() - started
        probs, labels, val_loss = validate(model, val_shard.iter_torch_batches(batch_size=config["batch_size"], device=device), objective)
        probs, labels = _gather(probs), _gather(labels)
        metrics = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(steps, 1),
            "val_loss": float(np.mean(_gather(np.array([val_loss])))),
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
