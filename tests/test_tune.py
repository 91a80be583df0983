"""jobs/tune.py: a search on Ray Tune writes an overlay that the experiment composes; a bad space fails before Ray starts."""

import csv
import shutil
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from adrec import tune
from tests.conftest import CONF, TINY

# A throwaway experiment, wired as conf/experiment/movielens.yaml is: its values, then the tuned overlay.
EXPERIMENT = """\
# @package _global_
defaults:
  - _self_
  - optional tuned@_global_: tiny
trainer: {epochs: 2, lr: 0.5}
"""
SPACE = """\
trainer.lr: {loguniform: [1.0e-3, 1.0e-2]}
model.embedding_dim: {choice: [8, 16]}
"""
# Both trials at once, each one worker on half a CPU (its reads take the other halves), so their
# start-up costs overlap.
FAST = [
    *TINY,
    "trainer.num_workers=1",
    "trainer.cpus_per_worker=0.5",
    "tune.max_concurrent=2",
    "trainer.log_every_steps=0",
    "trainer.tensorboard_dir=null",
    "trainer.epochs=2",
]


@pytest.fixture
def conf_dir(tmp_path) -> Path:
    """A copy of conf/ with the experiment ``tiny`` and its search space."""
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf, ignore=shutil.ignore_patterns("tuned"))
    (conf / "experiment" / "tiny.yaml").write_text(EXPERIMENT)
    (conf / "tune" / "space" / "tiny.yaml").write_text(SPACE)
    return conf


def compose_in(conf: Path, name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose(name, overrides=list(overrides))


@pytest.mark.slow
def test_a_search_writes_the_best_trial_as_an_overlay_the_experiment_composes(tiny_run, tmp_path, conf_dir):
    run_dir = tmp_path / "run"
    # The session's tiny log, prepared once for every test (so tune.prepare=false: the search only reads it).
    prepared = f"paths.prepared_dir={tiny_run['cfg'].paths.prepared_dir}"
    cfg = compose_in(conf_dir, "tune/search", f"run_dir={run_dir}", "experiment=tiny", *FAST, prepared, "tune.prepare=false", "tune.num_samples=2")
    result = tune.run(cfg, experiment="tiny", conf_dir=conf_dir, command="pytest")

    rows = list(csv.DictReader((Path(result["search_dir"]) / "trials.csv").open()))
    assert len(rows) == 2 and {r["status"] for r in rows} <= {"completed", "stopped"}
    assert all(r["val_auc"] and 1 <= int(r["epochs_trained"]) <= 2 for r in rows)  # per-epoch reports reached Tune
    best = result["best"]
    assert 1e-3 <= best["trainer.lr"] <= 1e-2 and best["model.embedding_dim"] in (8, 16)
    assert best["val_auc"] == max(float(r["val_auc"]) for r in rows)

    overlay = conf_dir / "experiment" / "tuned" / "tiny.yaml"
    assert result["overlay"] == str(overlay) and overlay.read_text().startswith("# @package _global_\n# Tuned by: pytest\n")
    tuned = compose_in(conf_dir, "config", f"run_dir={run_dir}", "experiment=tiny")
    # The overlay wins over the experiment's own trainer.lr (0.5); the rest of the experiment stays.
    assert tuned.trainer.lr == best["trainer.lr"] and tuned.model.embedding_dim == best["model.embedding_dim"]
    assert tuned.trainer.epochs == 2


def test_an_unknown_key_in_the_space_is_an_error_naming_the_closest_key(tmp_path, conf_dir):
    (conf_dir / "tune" / "space" / "tiny.yaml").write_text("trainer.lrr: {loguniform: [1.0e-3, 1.0e-2]}\n")
    cfg = compose_in(conf_dir, "tune/search", f"run_dir={tmp_path}", "experiment=tiny")
    with pytest.raises(ValueError, match=r"trainer\.lrr is not a key of the composed config \(did you mean trainer\.lr\?\)"):
        tune.run(cfg, experiment="tiny", conf_dir=conf_dir)


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ("data.prepare.min_count: {choice: [1, 5]}\n", "outside model and trainer"),
        ("trainer.lr: {normal: [0, 1]}\n", "needs one distribution of"),
        (
            "trainer.epochs: {uniform: [1, 3]}\n",
            r"trainer.epochs: uniform \[1, 3\] samples 1.0, which fails: trainer.epochs=1.0: expected an integer",
        ),
    ],
)
def test_a_bad_space_fails_before_ray_starts(tmp_path, conf_dir, space, message):
    (conf_dir / "tune" / "space" / "tiny.yaml").write_text(space)
    cfg = compose_in(conf_dir, "tune/search", f"run_dir={tmp_path}", "experiment=tiny")
    with pytest.raises(ValueError, match=message):
        tune.run(cfg, experiment="tiny", conf_dir=conf_dir)


def test_an_experiment_without_a_space_or_without_a_name_is_an_error(tmp_path, conf_dir):
    from hydra.errors import ConfigCompositionException

    (conf_dir / "tune" / "space" / "tiny.yaml").unlink()
    cfg = compose_in(conf_dir, "tune/search", f"run_dir={tmp_path}", "experiment=tiny")
    with pytest.raises(ValueError, match=r"no search space declared for experiment=tiny: write .*tune/space/tiny.yaml"):
        tune.run(cfg, experiment="tiny", conf_dir=conf_dir)
    with pytest.raises(ConfigCompositionException, match="You must specify 'experiment'"):
        compose_in(conf_dir, "tune/search")
    with pytest.raises(ConfigCompositionException, match="experiment/nope"):
        compose_in(conf_dir, "tune/search", "experiment=nope")


def test_the_declared_spaces_compose_and_check(tmp_path, monkeypatch):
    """conf/tune/space/{movielens,criteo}.yaml name real keys, and every probe value builds a trial."""
    monkeypatch.setenv("ADREC_SHARED_DATA", "/shared/data")
    for experiment in ("movielens", "criteo"):
        cfg = compose_in(Path(CONF), "tune/search", f"run_dir={tmp_path}", f"experiment={experiment}")
        params = tune.parse_space(OmegaConf.to_container(cfg.tune.space), cfg)
        tune.check_trials(tune.base_config(cfg), params, tmp_path / "check")
        assert "trainer.lr" in {p.key for p in params}


def test_the_placement_group_of_a_dead_train_controller_is_released_and_no_other(ray_session):
    """A trial that ASHA stops dies with its Ray Train controller, whose workers' group would stay reserved."""
    import ray
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    @ray.remote(num_cpus=0)
    class Controller:  # creates a group for its workers, as a Train controller does
        def reserve(self) -> str:
            group = placement_group([{"CPU": 0.01}])
            ray.get(group.ready())
            return group.id.hex()

    stopped, running = Controller.remote(), Controller.remote()
    orphan, live = ray.get([stopped.reserve.remote(), running.reserve.remote()])
    own = placement_group([{"CPU": 0.01}])  # the driver's own, as Tune's trial groups are
    ray.get(own.ready())
    ray.kill(stopped)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not tune.release_orphaned_placement_groups():
        time.sleep(0.2)
    states = {key: placement_group_table()[key]["state"] for key in (orphan, live, own.id.hex())}
    assert states == {orphan: "REMOVED", live: "CREATED", own.id.hex(): "CREATED"}
    ray.kill(running)
    remove_placement_group(own)
    tune.release_after_search(timeout_s=30)  # waits for the killed controller, then frees its group
    assert placement_group_table()[live]["state"] == "REMOVED"
