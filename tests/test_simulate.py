"""The closed loop, end to end: the live Serve app, clicks from the hidden truth, feedback, retraining, promotion."""

import json
from pathlib import Path

import pytest

from tests.conftest import compose_config, free_port

pytestmark = pytest.mark.slow


def test_two_rounds_feed_back_retrain_and_swap_the_served_version(tiny_run):
    from serve import launch

    cfg = compose_config(
        Path(tiny_run["cfg"].run_dir),
        f"serve.port={free_port()}",
        "simulate.rounds=2",
        "simulate.views_per_round=150",
        "retrain.epochs=1",
        "retrain.margin=-1e9",  # always promote: a 1-epoch challenger on 500 rows may lose by a lot
    )
    serving = (Path(cfg.paths.models_dir) / "LATEST").read_text().strip()  # other tests may have exported since
    result = launch.run_simulation(cfg)  # what jobs/simulate.py runs
    first, second = result["rounds"]
    for r in (first, second):
        assert 0 < r["random_ctr"] < r["oracle_ctr"] <= r["max_ctr"] and 0 < r["ctr"] <= r["max_ctr"]
        # The oracle runs the app's own objective (pCTR x bid) with the truth: nothing earns more per view.
        assert r["revenue_per_view"] <= r["oracle_revenue_per_view"] + 1e-9
        assert r["ctr_over_oracle"] == pytest.approx(r["ctr"] / r["oracle_ctr"])
        assert 0 < r["served_pctr"] < 1
    (retrained,) = result["retrains"]
    assert retrained["new_impressions"] == 150 * 5  # round 1's impressions, all new to the serving version
    assert retrained["decision"]["promote"], retrained["decision"]
    assert retrained["serve"]["reloaded"], retrained["serve"]
    # Round 2 was served by the version round 1's feedback trained, hot-swapped into the live app.
    assert first["model_versions"] == [serving] and second["model_versions"] == [retrained["exported"]["version"]]
    saved = json.loads((Path(cfg.run_dir) / "simulate.json").read_text())
    assert saved["final_ctr_over_oracle"] == pytest.approx(second["ctr_over_oracle"])
    assert (Path(cfg.run_dir) / "simulate.png").stat().st_size > 10_000
