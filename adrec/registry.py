"""Model artifacts: checkpoints and exported, versioned model directories.

Weights are safetensors (loading never unpickles); every directory carries a
``manifest.json`` with the sha256 of each file, verified before anything is loaded,
so a corrupt or tampered artifact is refused instead of served.

An exported model directory holds::

    user_encoder.safetensors  user_encoder.json   the user (query) tower and its constructor args
    ad_encoder.safetensors    ad_encoder.json     the ad tower and its constructor args
    ad_embeddings.safetensors                     V for every catalog ad, (A, D), in ads.parquet order
    ranker.safetensors        ranker.json         optional: the DCN ranker that re-ranks the shortlist
    ads.parquet  users.parquet  feature_map.json  what Serve needs to encode requests
    model.json  metrics.json  manifest.json       bias, version, metrics, config, lineage, checksums
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from adrec.models.ranker import DCNRanker
from adrec.models.towers import EmbeddingMLPTower
from adrec.models.two_tower import TwoTower

MANIFEST = "manifest.json"
FEATURE_MAP = "feature_map.json"
LATEST = "LATEST"
OPTIMIZER = "optimizer.pt"
PROGRESS = "progress.json"
CHECKPOINT_FORMAT = "adrec.checkpoint/1"
MODEL_FORMAT = "adrec.model/1"


class ArtifactError(RuntimeError):
    """An artifact is missing, incomplete, or does not match its recorded checksums."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path, **fields) -> dict:
    """Record the sha256 of every file in ``directory`` (but the manifest) with ``fields``."""
    files = {p.name: sha256_file(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST}
    manifest = {**fields, "files": files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
    return manifest


def verify_manifest(directory: str | Path) -> dict:
    """Return the manifest after checking that it lists every file of ``directory`` and each matches.

    Raises ArtifactError otherwise: a file nobody checksummed is never loaded.
    """
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{directory} has no {MANIFEST}: not an adrec artifact, refusing to load it")
    manifest = json.loads(path.read_text())
    listed = manifest.get("files") or {}
    unlisted = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name != MANIFEST and p.name not in listed)
    if not listed or unlisted:
        raise ArtifactError(f"{path} does not cover {unlisted or 'any file'}: refusing to load unverified files")
    for name, expected in listed.items():
        file = directory / name
        if not file.is_file():
            raise ArtifactError(f"{file} is listed in the manifest but missing; the artifact is incomplete")
        if sha256_file(file) != expected:
            raise ArtifactError(f"{file} does not match its sha256 in {path}: corrupt or tampered, refusing to load it")
    return manifest


def save_weights(module: torch.nn.Module, path: Path) -> None:
    """A module's state dict as safetensors (plain tensors: nothing to unpickle on load)."""
    save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, path)


def _build(cls, config: dict):
    """``cls(**config)`` from an artifact's stored constructor arguments; a tower's encoder is stored by
    kind from a fixed set (adrec.models.sequence.ENCODERS), so nothing the artifact names is imported."""
    try:
        return cls(**config)
    except (TypeError, ValueError) as error:
        raise ArtifactError(f"{cls.__name__} arguments {sorted(config)} do not fit this adrec version ({error}); re-export the model") from None


def _load_weights(module: torch.nn.Module, path: Path) -> None:
    """``path``'s safetensors into ``module``; weights of another layout (an older adrec's) are an ArtifactError."""
    try:
        module.load_state_dict(load_file(path))
    except RuntimeError as error:
        first = str(error).splitlines()[1].strip() if "\n" in str(error) else str(error)
        raise ArtifactError(f"{path.name} does not fit this adrec version's {type(module).__name__} ({first}); re-export the model") from None


def _tower_from(config: dict) -> EmbeddingMLPTower:
    return _build(EmbeddingMLPTower, config)


def model_description(model: TwoTower | DCNRanker) -> dict:
    """What rebuilds ``model`` without the training config: its kind (one of MODEL_KINDS) and constructor arguments."""
    if isinstance(model, TwoTower):
        return {"kind": "two_tower", "user_tower": model.user_tower.config, "ad_tower": model.ad_tower.config}
    return {"kind": "dcn", "config": model.config}


# A checkpoint names its model by one of these kinds, never by a class path, so loading one can
# build only adrec's own models. (A stored training config, which retraining builds with
# adrec.models.build_model, may name only adrec's components: adrec.models.components.COMPONENTS.)
MODEL_KINDS = {
    "two_tower": lambda config: TwoTower(_tower_from(config["user_tower"]), _tower_from(config["ad_tower"])),
    "dcn": lambda config: _build(DCNRanker, config["config"]),
}


def save_checkpoint(
    model: TwoTower | DCNRanker,
    directory: str | Path,
    feature_map: str | Path,
    optimizer_state: dict | None = None,
    progress: dict | None = None,
    **fields,
) -> None:
    """Write a training checkpoint: weights, constructor args, the feature map it was trained
    with, optionally the optimizer state and the loop's progress (to resume), and a manifest."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy2(feature_map, directory / FEATURE_MAP)
    save_weights(model, directory / "model.safetensors")
    (directory / "model.json").write_text(json.dumps({"format": CHECKPOINT_FORMAT, **model_description(model)}, indent=2))
    if optimizer_state is not None:
        torch.save(optimizer_state, directory / OPTIMIZER)  # tensors and numbers only: loads with weights_only=True
    if progress is not None:
        (directory / PROGRESS).write_text(json.dumps(progress, indent=2, default=float))
    write_manifest(directory, format=CHECKPOINT_FORMAT, **fields)


def load_checkpoint(directory: str | Path) -> TwoTower | DCNRanker:
    """Rebuild a model from a checkpoint directory after verifying its checksums."""
    directory = Path(directory)
    verify_manifest(directory)
    config = json.loads((directory / "model.json").read_text())
    if config.get("format") != CHECKPOINT_FORMAT:
        raise ArtifactError(f"{directory} is not an adrec checkpoint (format {config.get('format')!r})")
    kind = config.get("kind", "two_tower")
    if kind not in MODEL_KINDS:
        raise ArtifactError(f"{directory} holds a model of kind {kind!r}; this adrec version builds only {', '.join(MODEL_KINDS)}")
    model = MODEL_KINDS[kind](config)
    model.load_state_dict(load_file(directory / "model.safetensors"))
    return model.eval()


def load_training_state(directory: str | Path) -> tuple[dict, dict | None, dict]:
    """(model state dict, optimizer state or None, progress) of a verified checkpoint, to resume from."""
    directory = Path(directory)
    verify_manifest(directory)
    weights = load_file(directory / "model.safetensors")
    optimizer = torch.load(directory / OPTIMIZER, weights_only=True) if (directory / OPTIMIZER).is_file() else None
    progress = json.loads((directory / PROGRESS).read_text()) if (directory / PROGRESS).is_file() else {}
    return weights, optimizer, progress


def check_same_features(checkpoint: str | Path, prepared_dir: str | Path) -> None:
    """Raise unless ``prepared_dir`` holds the feature map the checkpoint was trained with."""
    trained, current = Path(checkpoint) / FEATURE_MAP, Path(prepared_dir) / FEATURE_MAP
    if sha256_file(trained) != sha256_file(current):
        raise ArtifactError(
            f"{current} differs from the feature map {checkpoint} was trained with: preparation ran again "
            "after training; run jobs/train.py again (or jobs/pipeline.py) before evaluating or exporting"
        )


def check_grows_from(checkpoint: str | Path, prepared_dir: str | Path) -> None:
    """Raise unless ``prepared_dir``'s feature map is the checkpoint's, or grows it: the same features,
    every vocabulary's old values first at their own indices (``data.prepare.base_feature_map``)."""
    from adrec.features import FeatureMap

    old = FeatureMap.load(Path(checkpoint) / FEATURE_MAP)
    new = FeatureMap.load(Path(prepared_dir) / FEATURE_MAP)
    hint = "prepare with data.prepare.base_feature_map set to the checkpoint's feature_map.json to warm-start across new data"
    if [(f.name, f.kind, f.group, f.vocabulary, f.boundaries) for f in old.features] != [
        (f.name, f.kind, f.group, f.vocabulary, f.boundaries) for f in new.features
    ]:
        raise ArtifactError(f"{prepared_dir} has other features than {checkpoint}: {hint}")
    for name, vocabulary in old.vocabularies.items():
        grown = new.vocabularies.get(name)
        if grown is None or grown.values[: len(vocabulary.values)] != vocabulary.values:
            raise ArtifactError(f"vocabulary {name!r} of {prepared_dir} moves the checkpoint's ids: {hint}")


def load_grown(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> list[str]:
    """Load ``weights`` into ``model`` whose id tables may have more rows (a grown vocabulary):
    old rows are copied, new rows keep their fresh initialisation. Returns the grown tensors' names."""
    state = model.state_dict()
    grown = []
    for name, value in weights.items():
        target = state.get(name)
        if target is None:
            raise ArtifactError(f"the checkpoint has {name}, which this model does not: another architecture")
        if target.shape != value.shape:
            if target.shape[1:] != value.shape[1:] or target.shape[0] < value.shape[0]:
                raise ArtifactError(f"{name} is {tuple(value.shape)} in the checkpoint and {tuple(target.shape)} here: only id tables may grow")
            value = torch.cat([value, target[value.shape[0] :]])
            grown.append(name)
        state[name] = value
    model.load_state_dict(state)
    return grown


def new_version() -> str:
    return time.strftime("v%Y%m%d-%H%M%S", time.gmtime()) + f"-{time.time_ns() % 1_000_000:06d}"


def save_tower(tower: EmbeddingMLPTower, directory: Path, name: str) -> None:
    save_weights(tower, directory / f"{name}.safetensors")
    (directory / f"{name}.json").write_text(json.dumps(tower.config, indent=2))


def save_ranker(ranker: DCNRanker, directory: Path) -> None:
    save_weights(ranker, directory / "ranker.safetensors")
    (directory / "ranker.json").write_text(json.dumps(ranker.config, indent=2))


def load_ranker(directory: str | Path) -> DCNRanker | None:
    """The exported ranker of an already verified model directory, or None when it ships without one."""
    directory = Path(directory)
    if not (directory / "ranker.json").is_file():
        return None
    ranker = _build(DCNRanker, json.loads((directory / "ranker.json").read_text()))
    _load_weights(ranker, directory / "ranker.safetensors")
    return ranker.eval()


def load_tower(directory: str | Path, name: str) -> EmbeddingMLPTower:
    """Load ``name`` (user_encoder or ad_encoder) from an exported, already verified model directory."""
    directory = Path(directory)
    tower = _tower_from(json.loads((directory / f"{name}.json").read_text()))
    _load_weights(tower, directory / f"{name}.safetensors")
    return tower.eval()


def resolve_model_dir(path: str | Path) -> Path:
    """A version directory as given, or the one a registry root's LATEST file names."""
    path = Path(path)
    if (path / LATEST).is_file():
        return path / (path / LATEST).read_text().strip()
    if (path / MANIFEST).is_file():
        return path
    raise ArtifactError(
        f"{path} is neither an exported model directory (no {MANIFEST}) nor a registry root (no {LATEST}); "
        "run jobs/export.py first or point model_dir at its output"
    )


def load_ad_embeddings(directory: str | Path) -> torch.Tensor:
    return load_file(Path(directory) / "ad_embeddings.safetensors")["embeddings"]
