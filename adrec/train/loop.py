"""The Ray Train worker loop: pure steps; a report with a checkpoint after each epoch and
every ``checkpoint_every_steps`` steps.

The loss is ``model.loss`` (adrec.train.losses): BCE on impressions, the in-batch softmax of
the two towers, or a weighted sum of both.

Resuming: after a worker dies, Ray Train restarts the group (``trainer.max_failures``) and
``ray.train.get_checkpoint()`` returns the latest checkpoint; weights, optimizer state and
progress come back from it, and the restarted (seeded) stream skips the samples the run had
already trained on, so an epoch interrupted mid-way finishes with the samples it still owed. The
skip is exact with one worker; with several, Ray Data's split assigns blocks to workers
dynamically, so the skipped samples are the right number but not always the same ones. ``resume_from`` warm-starts the weights of a new run
instead (fresh optimizer, epoch 1).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from pathlib import Path

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
from adrec.registry import load_grown, load_training_state, save_checkpoint
from adrec.train.config import LoopConfig
from adrec.train.losses import LossConfig, candidate_log_q, catalog_rows_of_ids, full_softmax, in_batch_softmax
from adrec.train.monitor import EpochLog
from adrec.train.optim import SparseDenseAdam, build_optimizer
from adrec.train.ranking import RankingValidation

log = logging.getLogger(__name__)


class Objective:
    """The configured loss of a batch; holds what the softmax needs (ad frequencies, the catalog)."""

    def __init__(self, loss: LossConfig, feature_map: FeatureMap, catalog_path: str | None, device: torch.device) -> None:
        self.loss = loss
        self.log_frequency = None
        self.catalog: dict[str, torch.Tensor] = {}
        self.catalog_size = 0
        self.row_of_id = None  # (ad ids,) catalog rows: set when the softmax runs over the whole catalog
        if not loss.softmax_weight:
            return
        if "ad_id" not in {f.name for f in feature_map.features}:
            raise ValueError("model.loss.softmax_weight > 0 needs an ad_id feature (map ad_id in data.events.columns)")
        if catalog_path:
            table = pq.read_table(catalog_path)
            self.catalog = {k: v.to(device) for k, v in to_features(table, feature_map.names("ad")).items()}
            self.catalog_size = table.num_rows
        if self.catalog and self.catalog_size <= loss.full_softmax_max_ads:
            self.row_of_id = catalog_rows_of_ids(self.catalog["ad_id"], feature_map.cardinality("ad_id"))
            return
        if loss.uniform_negatives and not self.catalog:
            raise ValueError("model.loss.uniform_negatives needs an ad catalog (data.ads)")
        spec = feature_map.spec("ad_id")
        frequencies = feature_map.vocabularies[spec.vocabulary].frequencies() if spec.vocabulary else None
        if loss.logq_correction and frequencies is not None:
            self.log_frequency = torch.log(torch.from_numpy(frequencies).clamp(min=1e-12)).float().to(device)

    def negatives(self) -> dict[str, torch.Tensor] | None:
        """``uniform_negatives`` catalog rows drawn uniformly, as ad-tower inputs."""
        if not (self.catalog and self.loss.uniform_negatives):
            return None
        rows = torch.randint(self.catalog_size, (self.loss.uniform_negatives,), device=self.catalog["ad_id"].device)
        return {k: v[rows] for k, v in self.catalog.items()}

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(scalar loss, click logits (B,)) of one batch."""
        loss = self.loss
        if not loss.softmax_weight:
            logits = model(batch)
            return loss.bce_weight * nn.functional.binary_cross_entropy_with_logits(logits, batch["label"]), logits
        if self.row_of_id is not None:
            return self.full(model, batch)
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

    def full(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The softmax over the whole catalog (its embeddings computed in the same forward pass, for DDP)."""
        loss = self.loss
        logits, user, ad = model(batch, return_embeddings=True, negatives=self.catalog)
        catalog = ad[len(batch["label"]) :]  # (A, D): the batch's own ads come first
        softmax = full_softmax(user, catalog, self.row_of_id[batch["ad_id"]], batch["label"] > 0.5)
        bce = nn.functional.binary_cross_entropy_with_logits(logits, batch["label"])
        return loss.softmax_weight * softmax + loss.bce_weight * bce, logits


def regularization(model: nn.Module) -> torch.Tensor | float:
    """The model's own penalty, added to each training batch's loss (not to validation's): e.g. the
    ranker's wide part's L2 in logistic regression's units (``DCNRanker.regularization``); 0 without one."""
    penalty = getattr(getattr(model, "module", model), "regularization", None)  # DDP wraps the model
    return penalty() if penalty is not None else 0.0


def train_step(model: nn.Module, batch: dict[str, torch.Tensor], optimizer: SparseDenseAdam, objective: Objective, autocast) -> float:
    """One optimizer step on a batch of examples (label: clicked = 1); returns the loss."""
    with autocast():
        loss, _ = objective(model, batch)
        loss = loss + regularization(model)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def validate(model: nn.Module, batches, objective: Objective, autocast=contextlib.nullcontext) -> tuple[np.ndarray, np.ndarray, float]:
    """One pass over ``batches``: pCTR (N,), labels (N,) and the mean training objective.

    The objective at the training batch size stays comparable across epochs, and is the
    score to select on for implicit feedback, where AUC is undefined.
    """
    model.eval()
    probs, labels, total = [], [], 0.0
    for batch in batches:
        with autocast():
            loss, logits = objective(model, batch)
        total += float(loss) * len(batch["label"])
        probs.append(torch.sigmoid(logits.float()).cpu().numpy())
        labels.append(batch["label"].cpu().numpy())
    model.train()
    if not probs:
        return np.empty(0, np.float32), np.empty(0, np.float32), float("nan")
    probs, labels = np.concatenate(probs), np.concatenate(labels)
    return probs, labels, total / len(labels)


def parquet_batches(files: list[str], columns: list[str], batch_size: int, rank: int, world: int, device: torch.device):
    """Batches of this worker's share (every world-th row group) of Parquet ``files``, as tensors.

    Validation reads its split directly rather than through Ray Data: the training stream
    stays open across epochs, and a second Ray Data pipeline could wait forever for a CPU
    beside it on a small cluster. Memory is bounded by one row group.
    """
    groups = [(path, group) for path in files for group in range(pq.ParquetFile(path).num_row_groups)]
    for path, group in groups[rank::world]:
        table = pq.ParquetFile(path).read_row_group(group, columns=columns)
        for start in range(0, table.num_rows, batch_size):
            yield {k: v.to(device) for k, v in to_features(table.slice(start, batch_size), columns).items()}


def _gather(array: np.ndarray) -> np.ndarray:
    """Concatenate an array across all workers (identity with one worker)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return array
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, array)
    return np.concatenate(parts)


def autocast_for(precision: str, device: torch.device):
    """A context-manager factory: bf16 autocast (``precision`` bf16, or auto on a GPU) or nothing."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"trainer.precision={precision!r}: use auto (bf16 on GPU, fp32 on CPU), fp32 or bf16")
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def restore(model: nn.Module, optimizer: SparseDenseAdam, resume_from: str | None) -> dict:
    """Load what this run resumes from; return its progress ({} for a fresh start).

    A checkpoint of this run (after a worker failure) restores weights, optimizer and progress;
    ``resume_from`` (a checkpoint of another run) restores weights only. Either is verified
    against its checksums first.
    """
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            weights, optimizer_state, progress = load_training_state(directory)
        model.load_state_dict(weights)
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        log.info("resumed from %s at epoch %s step %s", checkpoint.path, progress.get("epoch"), progress.get("step"))
        return progress
    if resume_from:
        weights, _, _ = load_training_state(resume_from)
        grown = load_grown(model, weights)  # new users and ads: new rows; every old row as trained
        log.info("warm-started from %s (grown tables: %s)", resume_from, grown or "none")
    return {}


def maybe_inject_fault(step: int, config: LoopConfig) -> None:
    """Kill this worker process once at global step ``fail_at_step`` (fault-injection tests)."""
    marker = config.fault_marker
    if config.fail_at_step != step or ray.train.get_context().get_world_rank() != 0 or not marker:
        return
    if Path(marker).exists():  # injected in an earlier attempt: the restarted run goes on
        return
    Path(marker).write_text(f"worker killed at step {step}\n")
    os._exit(1)  # no cleanup, no exception: to Ray this is a dead worker


class Plateau:
    """Epochs since the validation score last improved: when to decay the learning rate, when to stop.

    ``patience`` (epochs without a better ``metric``, 0 = never) for early stopping, and
    ``decay_patience`` for multiplying the learning rate by the decay factor (counted again from
    each decay, as torch's ReduceLROnPlateau does). A NaN score never improves.
    """

    def __init__(self, metric: str, mode: str, patience: int, decay_patience: int) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"trainer.select_mode={mode!r}: use max or min")
        self.metric, self.sign = metric, 1.0 if mode == "max" else -1.0
        self.patience, self.decay_patience = patience, decay_patience
        self.best = -np.inf
        self.since_best = 0
        self.since_decay = 0

    def update(self, metrics: dict) -> None:
        score = self.sign * float(metrics.get(self.metric, np.nan))
        if score > self.best:
            self.best, self.since_best, self.since_decay = score, 0, 0
        else:
            self.since_best += 1
            self.since_decay += 1

    def should_decay(self) -> bool:
        if self.decay_patience and self.since_decay >= self.decay_patience:
            self.since_decay = 0
            return True
        return False

    def should_stop(self) -> bool:
        return bool(self.patience) and self.since_best >= self.patience


class Run:
    """One worker's training state: the model, optimizer, data shards and progress counters."""

    def __init__(self, config: LoopConfig) -> None:
        torch.manual_seed(config.seed)
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self.config = config
        self.context = ray.train.get_context()
        self.feature_map = FeatureMap.load(config.feature_map)
        model, loss_options = build_model(config.model, self.feature_map)
        self.device = ray.train.torch.get_device()
        self.autocast = autocast_for(config.precision, self.device)
        self.model = ray.train.torch.prepare_model(model)
        self.bare = getattr(self.model, "module", self.model)  # DDP wraps only when world size > 1
        self.optimizer = build_optimizer(self.model, config.lr, config.weight_decay, config.embedding_l2)
        self.objective = Objective(LossConfig.from_dict(loss_options), self.feature_map, config.catalog, self.device)
        self.ranking = RankingValidation(*config.validation_ranking, self.feature_map) if config.validation_ranking else None
        progress = restore(self.bare, self.optimizer, config.resume_from)
        self.epoch = int(progress.get("epoch", 0))  # completed epochs
        self.step = int(progress.get("step", 0))
        # Samples this worker had trained on in the epoch a mid-epoch checkpoint interrupted.
        self.epoch_samples = int(progress.get("epoch_samples", 0))
        self.history: list[dict] = list(progress.get("history", []))
        self.plateau = Plateau(config.select_metric, config.select_mode, config.early_stopping_patience, config.lr_decay_patience)
        for metrics in self.history:  # a resumed run counts the epochs it had already validated
            self.plateau.update(metrics)
        self.monitor = EpochLog(config, rank=self.context.get_world_rank())
        self.stream = None  # the run's single training stream (trainer.stream_epochs)
        self.streamed = 0  # samples it has delivered
        # Samples the interrupted run had already taken from its stream (or its epoch's pass):
        # a restarted, seeded stream skips them, so training resumes where it stopped.
        self.skip = int(progress.get("stream_samples", self.epoch_samples))

    def batches(self, split: str, shuffle: bool):
        shard = ray.train.get_dataset_shard(split)
        return shard.iter_torch_batches(
            batch_size=self.config.batch_size,
            local_shuffle_buffer_size=self.config.shuffle_buffer if shuffle else None,
            local_shuffle_seed=self.config.seed + self.context.get_world_rank() if shuffle else None,
            prefetch_batches=self.config.prefetch_batches,
            device=self.device,
        )

    def train_batches(self):
        """This epoch's training batches: ``epoch_rows`` samples, less those an interrupted
        epoch had already trained on (so a resumed run takes as many steps as an uninterrupted one).

        With ``stream_epochs`` the driver passed the training split's files once per epoch, and
        the run reads them as one stream, of which an epoch is the next ``epoch_rows`` samples:
        the data pipeline starts once per run instead of once per epoch (seconds each here).
        Blocks may arrive slightly out of order, so epochs can blend at their edges.
        """
        budget = self.config.epoch_rows - self.epoch_samples
        if self.config.stream_epochs:
            self.stream = self.stream or self.skipped(iter(self.batches("train", shuffle=True)))
            source = self.stream
        else:
            source = self.skipped(iter(self.batches("train", shuffle=True)))
        seen = 0
        for batch in source:
            yield batch
            seen += len(batch["label"])
            self.streamed += len(batch["label"])
            if seen >= budget:
                return

    def skipped(self, batches):
        """``batches`` after the first ``self.skip`` samples (once, after a restart)."""
        dropped, self.streamed = 0, self.skip
        while dropped < self.skip:
            dropped += len(next(batches)["label"])
        self.skip = 0
        return batches

    def report(self, metrics: dict, in_epoch: bool) -> None:
        """Report metrics with a checkpoint (written by rank 0) that holds everything to resume."""
        progress = {
            "epoch": self.epoch,
            "step": self.step,
            # A mid-epoch checkpoint resumes its epoch with the samples still due (data is not checkpointed).
            "epoch_samples": self.epoch_samples if in_epoch else 0,
            "stream_samples": self.streamed if self.config.stream_epochs else (self.epoch_samples if in_epoch else 0),
            "history": self.history,
        }
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if self.context.get_world_rank() == 0:
                save_checkpoint(
                    self.bare,
                    tmp,
                    self.config.feature_map,
                    optimizer_state=self.optimizer.state_dict(),
                    progress=progress,
                    epoch=metrics["epoch"],
                    step=self.step,
                    metrics=metrics,
                )
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)

    def train_epoch(self) -> dict:
        config, every = self.config, self.config.checkpoint_every_steps
        started, seen, loss_sum, steps, first_batch = time.perf_counter(), 0, 0.0, 0, None
        for batch in self.train_batches():
            first_batch = first_batch or time.perf_counter() - started
            loss_sum += train_step(self.model, batch, self.optimizer, self.objective, self.autocast)
            seen += len(batch["label"])
            self.epoch_samples += len(batch["label"])
            steps += 1
            self.step += 1
            maybe_inject_fault(self.step, config)
            self.monitor.step(self.epoch + 1, self.step, loss_sum / steps, seen * self.context.get_world_size(), started)
            if every and self.step % every == 0:
                # No validation mid-epoch: the score is NaN, so best-k keeps epoch ends (Ray keeps the latest too).
                self.report(
                    {"epoch": self.epoch + 1, "step": self.step, "train_loss": loss_sum / steps, config.select_metric: float("nan")}, in_epoch=True
                )
        seconds = time.perf_counter() - started
        self.epoch_samples = 0
        return {
            "train_loss": loss_sum / max(steps, 1),
            "samples_per_s": seen * self.context.get_world_size() / max(seconds, 1e-9),
            "steps": steps,
            "train_seconds": seconds,
            "first_batch_seconds": first_batch or seconds,  # the data pipeline's start-up within the epoch
        }

    def validate_epoch(self) -> dict:
        started = time.perf_counter()
        batches = parquet_batches(
            list(self.config.validation_files),
            list(self.config.columns),
            self.config.batch_size,
            self.context.get_world_rank(),
            self.context.get_world_size(),
            self.device,
        )
        probs, labels, val_loss = validate(self.model, batches, self.objective, self.autocast)
        losses = _gather(np.array([val_loss * len(labels) if len(labels) else 0.0]))
        probs, labels = _gather(probs), _gather(labels)
        # Every worker ranks the same users with the same (synchronised) weights, so all report alike.
        ranking = self.ranking(self.bare) if self.ranking else {}
        return {
            "val_loss": float(losses.sum() / max(len(labels), 1)),
            "val_auc": auc(labels, probs),
            "val_logloss": logloss(labels, probs),
            **ranking,
            "validate_seconds": time.perf_counter() - started,
        }

    def fit(self) -> dict:
        """Train up to ``epochs`` epochs, validating and checkpointing after each; stop early on a plateau."""
        while self.epoch < self.config.epochs and not self.plateau.should_stop():
            lr = self.optimizer.lr
            trained = self.train_epoch()
            self.epoch += 1
            metrics = {"epoch": self.epoch, "step": self.step, "lr": lr, **trained, **self.validate_epoch()}
            self.plateau.update(metrics)
            if self.plateau.should_decay():
                self.optimizer.scale_lr(self.config.lr_decay_factor)
            self.history.append(metrics)
            self.monitor.epoch(metrics)
            # Every worker decides alike: the score is gathered over all of them.
            self.report(metrics, in_epoch=False)
        self.monitor.close()
        return {"epochs": self.history}


def train_loop_per_worker(config: LoopConfig) -> dict:
    """Train the configured model on this worker's shard of ``train``; validate on ``validation``.

    ``config`` was resolved on the driver (adrec.train.config.LoopConfig: absolute paths, the
    scaled learning rate, this worker's rows per epoch). Returns ``{"epochs": [metrics, ...]}``.
    """
    return Run(config).fit()
