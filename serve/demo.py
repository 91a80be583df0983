"""Start the Serve app on an exported model, send a few /recommend requests over HTTP, shut down."""

from __future__ import annotations

import json
import urllib.request

import pyarrow.parquet as pq
from omegaconf import OmegaConf

from adrec.recommend import feature_builder
from adrec.registry import resolve_model_dir
from adrec.runtime import resolve
from serve import launch
from serve.schemas import AppArgs


def post_json(url: str, body: dict, timeout_s: float = 30.0) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


EXAMPLE_CONTEXT = {"slot": "top", "device": "mobile"}  # the synthetic log's context; other logs' models get none
EXAMPLE_ATTRIBUTES = {"age_bucket": "25-34"}


def demo_requests(model_dir: str, count: int) -> list[dict]:
    """Requests for ``count`` known users (with context), then one user the model has never seen,
    each holding only the example fields the model knows (it refuses others with 422)."""
    model_dir = resolve_model_dir(model_dir)
    builder = feature_builder(model_dir)
    context = {k: v for k, v in EXAMPLE_CONTEXT.items() if k in builder.context_columns}
    attributes = {k: v for k, v in EXAMPLE_ATTRIBUTES.items() if k in builder.attribute_columns}
    known = pq.read_table(model_dir / "users.parquet", columns=["raw_user_id"])["raw_user_id"].slice(0, count).to_pylist()
    bodies = [{"user_id": uid, "k": 5, "context": context} for uid in known]
    bodies.append({"user_id": "never-seen-user", "k": 5, "attributes": attributes})
    return bodies


def demo(args: AppArgs, host: str, port: int, count: int) -> list[dict]:
    """Serve ``args``, print and return the answers to ``count`` + 1 demo requests."""
    url = launch.start(args, host, port)
    answers = []
    try:
        for body in demo_requests(args.model_dir, count):
            status, answer = post_json(f"{url}/recommend", body)
            print(f"POST /recommend {json.dumps(body)}\n  -> {status} {json.dumps(answer)}", flush=True)
            answers.append({"request": body, "status": status, "response": answer})
    finally:
        launch.stop()
    return answers


def run(cfg) -> list[dict]:
    """The demo of jobs/pipeline.py: ``cfg.serve`` (host, port, app) and ``cfg.pipeline.demo_requests``."""
    settings = OmegaConf.to_container(cfg.serve.app, resolve=True)
    args = launch.app_args(settings, model_dir=resolve(settings["model_dir"]))
    return demo(args, cfg.serve.host, int(cfg.serve.port), int(cfg.pipeline.demo_requests))
