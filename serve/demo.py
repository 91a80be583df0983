"""Start the Serve app on an exported model, send a few /recommend requests over HTTP, shut down."""

from __future__ import annotations

import json
import urllib.request

import pyarrow.parquet as pq
from ray import serve

from adrec.registry import resolve_model_dir
from adrec.runtime import resolve
from serve.app import AppArgs, build_app, shutdown


def post_json(url: str, body: dict, timeout_s: float = 30.0) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def demo_requests(model_dir: str, count: int) -> list[dict]:
    """Requests for ``count`` known users (with context), then one user the model has never seen."""
    users = pq.read_table(resolve_model_dir(model_dir) / "users.parquet", columns=["raw_user_id"])["raw_user_id"]
    known = users.slice(0, count).to_pylist()
    bodies = [{"user_id": uid, "k": 5, "context": {"slot": "top", "device": "mobile"}} for uid in known]
    bodies.append({"user_id": "never-seen-user", "k": 5, "attributes": {"age_bucket": "25-34"}})
    return bodies


def run(cfg) -> list[dict]:
    """Serve ``cfg.serve.model_dir``, print and return the answers to the demo requests."""
    model_dir = resolve(cfg.serve.model_dir)
    serve.start(http_options={"host": cfg.serve.host, "port": int(cfg.serve.port)})
    app = build_app(
        AppArgs(
            model_dir=model_dir,
            max_k=cfg.serve.max_k,
            max_history=cfg.serve.max_history,
            user_encoder=dict(cfg.serve.user_encoder),
            ad_index=dict(cfg.serve.ad_index),
        )
    )
    serve.run(app, name="adrec", route_prefix="/", logging_config={"enable_access_log": False})
    url = f"http://{cfg.serve.host}:{cfg.serve.port}/recommend"
    answers = []
    try:
        for body in demo_requests(model_dir, int(cfg.pipeline.demo_requests)):
            status, answer = post_json(url, body)
            print(f"POST /recommend {json.dumps(body)}\n  -> {status} {json.dumps(answer)}", flush=True)
            answers.append({"request": body, "status": status, "response": answer})
    finally:
        shutdown("adrec")
        serve.shutdown()
    return answers
