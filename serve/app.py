"""The adrec Serve application: four deployments behind one FastAPI ingress.

    Ingress (serve/ingress.py)      HTTP, validation, the auction      -> the Marketplace actor
      -> UserEncoder -> AdIndex -> Ranker (serve/deployments.py)      chained replica to replica
    ServingState actor (serve/versions.py): the serving version and the ad-update log, for every replica

Start it with ``serve run serve/config.yaml`` or ``serve run serve.app:build_app model_dir=...``;
from Python, ``serve.launch.start(AppArgs(...))``.
"""

# No `from __future__ import annotations` here: `serve run` validates the arguments against
# build_app's annotation, which must be the AppArgs class itself, not the string "AppArgs".
import logging
import os
from pathlib import Path

import ray
from ray import serve

from adrec.recommend import verified
from adrec.registry import ArtifactError
from adrec.runtime import resolve
from serve.deployments import AdIndex, Ranker, UserEncoder
from serve.ingress import Ingress
from serve.schemas import AppArgs
from serve.versions import STATE_NAMESPACE

logger = logging.getLogger("ray.serve")


def nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def checked_model_dir(args: AppArgs) -> str:
    """The version every replica will load, checked here, where ``serve run`` prints why it cannot
    start; a replica's own failure reaches the console only as "Failed to update the deployments".
    Replicas read the environment of the shell that started them, as this process does."""
    problems = []
    model_dir = None
    try:
        model_dir = str(verified(resolve(args.model_dir))[0])
    except (ArtifactError, OSError) as failure:
        problems.append(f"model_dir: {failure}")
    secret = args.feedback_secret_value()
    if secret is not None and len(secret.encode()) < 16:
        problems.append(
            f"the feedback secret (args.feedback_secret or ${args.feedback_secret_env}) is {len(secret.encode())} bytes; "
            "it must be at least 16: set a long random one"
        )
    if args.feedback_dir and not os.access(nearest_existing(Path(resolve(args.feedback_dir))), os.W_OK):
        problems.append(f"feedback_dir {resolve(args.feedback_dir)} cannot be written; choose a writable folder")
    if problems:
        raise ValueError("adrec cannot start the app:\n  " + "\n  ".join(problems))
    if args.feedback_dir and secret is None:
        logger.warning("adrec: feedback_dir is set but no feedback secret is: POST /feedback will answer 503 (set $%s)", args.feedback_secret_env)
    return model_dir


def replica_settings(args: AppArgs, model_dir: str) -> dict:
    """``args`` as the ingress replicas get them: one pinned version, absolute paths (replicas'
    working directories differ), and the secrets themselves (a pydantic dump masks them)."""
    settings = args.model_dump(mode="json")
    settings["model_dir"] = model_dir
    if args.feedback_dir:
        settings["feedback_dir"] = resolve(args.feedback_dir)
    for name in ("feedback_secret", "admin_token"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name).get_secret_value()
    return settings


def build_app(args: AppArgs) -> serve.Application:
    """Typed app builder: Serve validates ``serve run`` arguments and config-file ``args`` against AppArgs."""
    model_dir = checked_model_dir(args)
    index_options = {"exact_max_ads": args.ad_index.exact_max_ads, "nprobe": args.ad_index.nprobe, "nlist": args.ad_index.nlist, "threads": 1}
    encoder = UserEncoder.options(**args.user_encoder.options()).bind(
        model_dir, args.user_encoder.max_batch_size, args.user_encoder.batch_wait_timeout_s, args.poll_s
    )
    index = AdIndex.options(**args.ad_index.options()).bind(model_dir, index_options, args.popular, args.poll_s)
    ranker = Ranker.options(**args.ranker.options()).bind(model_dir, args.poll_s)
    return Ingress.options(**args.ingress.options()).bind(encoder, index, ranker, replica_settings(args, model_dir))


def shutdown(app_name: str = "adrec") -> None:
    """Delete the app and its state actors (the serving version, ad log, budgets and caps)."""
    serve.delete(app_name)
    for suffix in ("state", "market"):
        try:
            ray.kill(ray.get_actor(f"{app_name}-{suffix}", namespace=STATE_NAMESPACE))
        except ValueError:
            pass
