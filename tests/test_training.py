"""Each user encoder and the retrieval loss train through Ray Train by changing config values."""

from pathlib import Path

import pytest

from adrec.registry import load_checkpoint
from adrec.train import driver
from tests.conftest import compose_config


@pytest.mark.parametrize(
    "encoder, loss",
    [
        ("cnn", []),
        ("gru", ["model.loss.softmax_weight=1.0", "model.loss.uniform_negatives=64"]),
        ("attention", ["model.loss.softmax_weight=0.5", "model.normalize=true", "model.temperature=0.1"]),
    ],
)
def test_user_encoder_trains_from_one_config_value(tiny_run, tmp_path, encoder, loss):
    prepared = tiny_run["cfg"].paths.prepared_dir
    cfg = compose_config(
        tmp_path,
        f"paths.prepared_dir={prepared}",
        f"model/user_encoder={encoder}",
        *loss,
        "trainer.num_workers=1",
        "trainer.cpus_per_worker=1",
        "trainer.epochs=2",
    )
    result = driver.run(cfg)
    assert [e["epoch"] for e in result["epochs"]] == [1, 2]
    assert result["best"]["val_auc"] > 0.6, result["best"]  # the planted affinity is learnable in two epochs
    model = load_checkpoint(result["best_checkpoint"])
    assert model.user_tower.config["encoder"]["kind"] == encoder
    assert model.user_tower.config["behaviour"].keys() == {"history", "history_category"}


def test_selection_trains_each_encoder_and_marks_the_best_on_validation(tiny_run, tmp_path):
    from adrec.runtime import read_json
    from adrec.train import select

    cfg = compose_config(
        tmp_path,
        f"paths.prepared_dir={tiny_run['cfg'].paths.prepared_dir}",
        "select.encoders=[mlp,gru]",
        "trainer.num_workers=1",
        "trainer.cpus_per_worker=1",
        "trainer.epochs=1",
    )
    selection = select.run(cfg)
    scores = {name: c["validation"]["val_auc"] for name, c in selection["candidates"].items()}
    assert set(scores) == {"mlp", "gru"} and selection["winner"] == max(scores, key=scores.get)
    chosen = read_json(Path(cfg.paths.train_dir) / "result.json")
    assert chosen["selected_encoder"] == selection["winner"]
    assert load_checkpoint(chosen["best_checkpoint"]).user_tower.config["encoder"]["kind"] == selection["winner"]


def test_sparse_id_tables_train_data_parallel(tiny_run, tmp_path):
    # Two workers: DDP exchanges the touched rows of each sparse table; SparseAdam updates them.
    cfg = compose_config(tmp_path, f"paths.prepared_dir={tiny_run['cfg'].paths.prepared_dir}", "model.sparse_embeddings=true", "trainer.epochs=2")
    result = driver.run(cfg)
    assert result["workers"] == 2 and result["best"]["val_auc"] > 0.6, result["best"]
    model = load_checkpoint(result["best_checkpoint"])
    assert model.user_tower.config["sparse"] and model.user_tower.embeddings["user_id"].sparse


def test_training_stops_after_patience_epochs_without_a_better_score(tiny_run, tmp_path):
    # A zero learning rate leaves the weights, so the validation score never improves after epoch 1.
    cfg = compose_config(
        tmp_path,
        f"paths.prepared_dir={tiny_run['cfg'].paths.prepared_dir}",
        "trainer.num_workers=1",
        "trainer.lr=0.0",
        "trainer.epochs=5",
        "trainer.early_stopping_patience=1",
    )
    result = driver.run(cfg)
    assert [e["epoch"] for e in result["epochs"]] == [1, 2]
    assert result["best"]["epoch"] == 1


def test_each_epoch_ranks_the_catalog_for_validation_users_and_selects_on_it(tiny_run, tmp_path):
    cfg = compose_config(
        tmp_path,
        f"paths.prepared_dir={tiny_run['cfg'].paths.prepared_dir}",
        "trainer.num_workers=1",
        "trainer.epochs=2",
        "trainer.validation_ranking_k=10",
        "trainer.select_metric=val_ndcg@10",
        "model.item_bias=true",
    )
    result = driver.run(cfg)
    scores = [e["val_ndcg@10"] for e in result["epochs"]]
    assert all(0.0 <= s <= 1.0 for s in scores) and all(e["val_ranking_users"] > 0 for e in result["epochs"])
    assert result["best"]["epoch"] == 1 + scores.index(max(scores))
    model = load_checkpoint(result["best_checkpoint"])
    assert model.ad_tower.width == model.user_tower.width == model.ad_tower.config["output_dim"] + 1


def test_a_ranking_select_metric_needs_its_k(tmp_path):
    cfg = compose_config(tmp_path, "trainer.select_metric=val_recall@10")
    with pytest.raises(ValueError, match="validation_ranking_k=10"):
        driver.run(cfg)


def test_plateau_decays_the_rate_and_stops_on_its_own_counts():
    from adrec.train.loop import Plateau

    plateau = Plateau("val_recall@10", "max", patience=3, decay_patience=1)
    decays, stopped_after = [], None
    for epoch, score in enumerate([0.1, 0.2, 0.2, 0.19, 0.15], start=1):
        plateau.update({"val_recall@10": score})
        decays.append(plateau.should_decay())
        if plateau.should_stop():
            stopped_after = epoch
            break
    assert decays == [False, False, True, True, True]
    assert stopped_after == 5


def test_a_misspelled_trainer_option_is_named_before_ray_starts(tmp_path):
    # `+` adds a key Hydra's struct check would refuse; a mapping edited in code (open_dict) gets the same check.
    cfg = compose_config(tmp_path, "+trainer.epoch=3")
    with pytest.raises(ValueError, match=r"trainer\.epoch is not a trainer option \(did you mean trainer\.epochs\?\); known: .*\bepochs\b"):
        driver.run(cfg)


def test_a_misspelled_model_option_is_named_before_any_worker_starts(tmp_path):
    """Nothing is prepared under tmp_path: the model config is checked before Ray or the data is looked for."""
    cfg = compose_config(tmp_path, "model/user_encoder=attention", "+model.user_encoder.head=4")
    with pytest.raises(ValueError, match=r"model\.user_encoder\.head is not an option .*did you mean model\.user_encoder\.heads"):
        driver.run(cfg)


def test_trainer_options_mirror_the_yaml_and_name_what_is_wrong(tmp_path):
    from omegaconf import OmegaConf

    from adrec.train.config import TrainerOptions

    group = compose_config(tmp_path).trainer
    options = TrainerOptions.from_config(group)
    assert options.epochs == 3 and options.cpus_per_worker == 0.5 and options.mlflow.experiment == "adrec"
    assert options.storage_path == str(tmp_path / "train")  # interpolations resolved
    plain = OmegaConf.to_container(group, resolve=True)
    with pytest.raises(ValueError, match=r"trainer\.mlflow\.tracking_url is not a trainer\.mlflow option"):
        TrainerOptions.from_config({**plain, "mlflow": {"tracking_url": "file:///x", "experiment": "adrec"}})
    with pytest.raises(ValueError, match=r"trainer\.epochs missing"):
        TrainerOptions.from_config({k: v for k, v in plain.items() if k != "epochs"})
    with pytest.raises(ValueError, match=r"trainer\.batch_size='512': expected an integer"):
        TrainerOptions.from_config({**plain, "batch_size": "512"})
    with pytest.raises(ValueError, match=r"trainer\.epochs is null"):
        TrainerOptions.from_config({**plain, "epochs": None})


def test_the_training_stream_shuffles_row_groups_across_files_each_epoch(tmp_path):
    """Two files of three row groups: each epoch lists all six once, in an order of its own that
    does not feed one file's groups as one run (files are few and large on small logs)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    split = tmp_path / "train"
    split.mkdir()
    for name in ("a", "b"):
        pq.write_table(pa.table({"row": list(range(30))}), split / f"{name}.parquet", row_group_size=10)
    order = [(Path(path).stem, group) for _, path, group in driver.epoch_row_groups(split, epochs=3, seed=0)]
    epochs = [order[:6], order[6:12], order[12:]]
    pieces = {(name, group) for name in "ab" for group in range(3)}
    assert all(sorted(epoch) == sorted(pieces) for epoch in epochs) and len(order) == 18
    assert len({tuple(epoch) for epoch in epochs}) == 3
    runs = [epoch for epoch in epochs if [name for name, _ in epoch] not in (list("aaabbb"), list("bbbaaa"))]
    assert runs  # some epoch interleaves the two files' groups
