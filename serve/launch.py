"""Start and stop the app from Python: for the main job's demo, the closed-loop simulator and
the benchmarks (``serve run`` and ``serve deploy`` need none of this)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from pathlib import Path

from omegaconf import OmegaConf
from pydantic import ValidationError
from ray import serve

from adrec.feedback import simulate
from adrec.runtime import init_ray_from, resolve
from serve.app import build_app, shutdown
from serve.schemas import AppArgs

APP_NAME = "adrec"


def app_args(settings: Mapping, **overrides) -> AppArgs:
    """``AppArgs`` from the Hydra ``serve.app`` settings (every default is AppArgs' own), with
    ``overrides``; an unknown or bad setting is a ValueError naming it."""
    try:
        return AppArgs(**{**settings, **overrides})
    except ValidationError as failure:
        problems = "; ".join(f"serve.app.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in failure.errors())
        raise ValueError(f"{problems} (the settings are serve/schemas.py AppArgs)") from None


def start(args: AppArgs, host: str = "127.0.0.1", port: int = 8000) -> str:
    """Serve ``args`` at http://host:port/ on the connected Ray; return that URL once the app is running."""
    serve.start(http_options={"host": host, "port": int(port)})
    serve.run(build_app(args), name=APP_NAME, route_prefix="/", logging_config={"enable_access_log": False})
    return f"http://{host}:{port}"


def stop() -> None:
    """Delete the app with its state actors, and stop Serve."""
    shutdown(APP_NAME)
    serve.shutdown()


def simulation_args(settings: Mapping, model_dir: str, feedback_dir: str, admin_token: str, feedback_secret: str, explore: float) -> AppArgs:
    """The app as the closed-loop simulator needs it: feedback on, no caps, patient, and no CPU held."""
    return app_args(
        settings,
        model_dir=model_dir,
        feedback_dir=feedback_dir,
        feedback_secret=feedback_secret,
        admin_token=admin_token,
        explore=explore,
        frequency_cap={"max_impressions": 1_000_000, "window_s": 1},  # the policies compared have no caps
        deadline_ms=30_000,  # retraining shares the node's cores: slow answers, not dropped ones
        # No CPU reserved: retraining between rounds needs the node's CPUs for its data and
        # workers, and would wait forever for what idle replicas hold.
        **{name: {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0} for name in ("ingress", "user_encoder", "ad_index", "ranker")},
    )


def run_simulation(cfg) -> dict:
    """jobs/simulate.py (a job adapter, so it takes the config): adrec.feedback.simulate's closed
    loop against this app, started on the loop's copy of the model registry and stopped after."""
    init_ray_from(cfg)
    looped = simulate.loop_config(cfg)
    admin_token = secrets.token_urlsafe(24)
    os.environ[cfg.retrain.admin_token_env] = admin_token  # retraining's hot swap reads it
    settings = OmegaConf.to_container(cfg.serve.app, resolve=True)
    args = simulation_args(
        settings, looped.paths.models_dir, looped.paths.feedback_dir, admin_token, secrets.token_urlsafe(32), float(cfg.simulate.explore)
    )
    url = start(args, cfg.serve.host, int(cfg.serve.port))
    try:
        return simulate.run(looped, url, Path(resolve(cfg.run_dir)))
    finally:
        stop()
