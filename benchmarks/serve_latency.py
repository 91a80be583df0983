"""Serving latency: the Serve app against a bare FastAPI process doing the same computation.

    python benchmarks/serve_latency.py                          # what the README quotes
    python benchmarks/serve_latency.py --catalogs 10000 --concurrency 1 --seconds 3   # a smoke run
    python benchmarks/serve_latency.py --catalogs 10000 --no-latency-mode              # Serve's defaults

For each catalog size, a model version is derived from an exported one (``--model-dir``,
default the main job's): its catalog is grown to N ads by recombining the logged ads'
advertisers, categories and words (new ids, bids drawn like the logged ones), every ad
embedded by the trained ad tower. Catalogs above ``exact_max_ads`` get a FAISS IVF index,
whose recall@100 against exact search is measured on logged users' embeddings when it is built.

Then, per catalog and concurrency, ``--seconds`` of closed-loop POST /recommend traffic
(each client sends its next request when the last one answers) against
    serve   the Ray Serve app (serve/app.py): proxy -> ingress -> encoder -> index -> ranker, auction actor
    bare    one uvicorn process running adrec.recommend.LocalRecommender: the same features,
            towers, index, ranker and auction code, with no hops
Both validate with the same request models and run torch and FAISS on one thread per process.

Prints JSON: ``runs`` (one object per catalog and concurrency: p50_ms, p99_ms, qps, the bare
app's figures, ratio_p50, and the Serve app's median time per hop from its Server-Timing
header), ``ann_recall_at_100`` and the index build figures.
"""

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from adrec.inference import column_to_numpy, embed  # noqa: E402
from adrec.registry import load_tower, resolve_model_dir, verify_manifest, write_manifest  # noqa: E402
from adrec.runtime import wait_until_ok  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HOPS = ("features", "encode", "index", "rank", "hops", "auction", "total")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- catalogs ---------------------------------------------------------------------------------


def grown_catalog(ads: pa.Table, size: int, rng: np.random.Generator) -> pa.Table:
    """``size`` ads recombined from ``ads``: each takes a logged ad's advertiser, campaign and category,
    and each of its words from that ad or, half the time, from another random ad; ids are new
    (out of vocabulary, as fresh ads are), so the ad tower embeds them from their content."""
    template = rng.integers(0, ads.num_rows, size)
    columns = {
        "raw_ad_id": pa.array([f"bench-{i}" for i in range(size)]),
        "bid": pa.array(rng.lognormal(0, 0.5, size).astype(np.float32)),
    }
    for name in ads.column_names:
        if name not in ("raw_ad_id", "bid", "tokens"):
            columns[name] = ads[name].take(pa.array(template))
    words = column_to_numpy(ads["tokens"])  # (A, L) encoded word ids
    donors = rng.integers(0, ads.num_rows, (size, words.shape[1]))
    positions = np.arange(words.shape[1])
    mixed = np.where(rng.random((size, len(positions))) < 0.5, words[template], words[donors, positions])
    columns["tokens"] = pa.array(list(mixed), pa.list_(pa.int64()))
    columns["ad_id"] = pa.array(np.ones(size, np.int64))  # OOV: the ad tower has never seen these ids
    return pa.table(columns).select(ads.column_names)


def derive_version(model_dir: Path, size: int, out_root: Path) -> Path:
    """A copy of ``model_dir`` whose catalog has ``size`` ads, embedded by its ad tower, with a fresh manifest."""
    target = out_root / f"{model_dir.name}-ads{size}"
    if (target / "manifest.json").is_file():
        return target
    staging = out_root / f".{target.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(model_dir, staging)
    catalog = grown_catalog(pq.read_table(model_dir / "ads.parquet"), size, np.random.default_rng(size))
    pq.write_table(catalog, staging / "ads.parquet")
    tower = load_tower(model_dir, "ad_encoder")
    save_file({"embeddings": embed(tower, catalog).contiguous()}, staging / "ad_embeddings.safetensors")
    manifest = json.loads((model_dir / "manifest.json").read_text())
    manifest.pop("files")
    manifest["version"] = target.name
    model = json.loads((staging / "model.json").read_text())
    (staging / "model.json").write_text(json.dumps({**model, "version": target.name}, indent=2))
    write_manifest(staging, **manifest)
    staging.rename(target)
    return target


# --- load --------------------------------------------------------------------------------------


def request_bodies(model_dir: Path, count: int, rng: np.random.Generator) -> list[dict]:
    """Known users with page context, one in ten unknown (a cold start), as an ad server sends them."""
    users = pq.read_table(model_dir / "users.parquet", columns=["raw_user_id"])["raw_user_id"].to_pylist()
    bodies = []
    for i in range(count):
        user = f"unseen-{i}" if rng.random() < 0.1 else users[rng.integers(len(users))]
        context = {"slot": ["top", "side", "feed", "footer"][rng.integers(4)], "device": ["mobile", "desktop", "tablet"][rng.integers(3)]}
        bodies.append({"user_id": user, "k": 10, "context": context})
    return bodies


async def closed_loop(url: str, bodies: list[dict], concurrency: int, seconds: float, warmup_s: float) -> dict:
    """``concurrency`` clients, each posting its next request when the last is answered."""
    latencies, hops, failures = [], [], 0
    start = time.perf_counter()
    measure_from, end = start + warmup_s, start + warmup_s + seconds

    async def client(i: int) -> None:
        nonlocal failures
        n = i
        async with httpx.AsyncClient(timeout=30) as http:
            while (now := time.perf_counter()) < end:
                sent = time.perf_counter()
                answer = await http.post(url, json=bodies[n % len(bodies)])
                n += concurrency
                if now < measure_from:
                    continue
                if answer.status_code != 200:
                    failures += 1
                    continue
                latencies.append((time.perf_counter() - sent) * 1000)
                if "server-timing" in answer.headers:
                    hops.append(dict(part.split(";dur=") for part in answer.headers["server-timing"].split(", ")))

    await asyncio.gather(*(client(i) for i in range(concurrency)))
    figures = {
        "requests": len(latencies),
        "failed": failures,
        "p50_ms": round(float(np.percentile(latencies, 50)), 2),
        "p99_ms": round(float(np.percentile(latencies, 99)), 2),
        "qps": round(len(latencies) / seconds, 1),
    }
    if hops:
        figures["hop_p50_ms"] = {name: round(float(np.median([float(h[name]) for h in hops])), 2) for name in HOPS if name in hops[0]}
    return figures


# --- the two servers ---------------------------------------------------------------------------


def bare_app(model_dir: str, exact_max_ads: int, nprobe: int):
    """The bare baseline: one FastAPI app doing the Serve app's work in-process."""
    from fastapi import FastAPI, HTTPException

    from adrec.auction import FrequencyCap, Marketplace
    from adrec.recommend import LocalRecommender, UserQuery
    from serve.schemas import AppArgs, RecommendedAd, RecommendRequest, RecommendResponse

    torch.set_num_threads(1)
    args = AppArgs(model_dir=model_dir)
    cap = args.frequency_cap
    local = LocalRecommender(
        model_dir,
        Marketplace(FrequencyCap(cap.max_impressions, cap.window_s)),
        {"exact_max_ads": exact_max_ads, "nprobe": nprobe, "threads": 1},
        args.shortlist,
        args.popular,
    )
    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.post("/recommend", response_model=RecommendResponse)
    def recommend(request: RecommendRequest) -> RecommendResponse:
        if request.k > args.max_k or len(request.recent_ad_ids) > args.max_history:
            raise HTTPException(413)
        result, cold = local.recommend(UserQuery(request.user_id, request.recent_ad_ids, request.attributes, request.context), request.k)
        return RecommendResponse(
            request_id="-",
            user_id=request.user_id,
            model_version=local.version,
            cold_start=cold,
            ads=[RecommendedAd(**vars(ad)) for ad in result.ads],
            candidates=result.candidates,
            removed=result.removed,
        )

    return app


def start_bare(model_dir: Path, port: int, exact_max_ads: int, nprobe: int) -> subprocess.Popen:
    command = [
        sys.executable,
        __file__,
        "--bare-server",
        str(model_dir),
        "--port",
        str(port),
        "--exact-max-ads",
        str(exact_max_ads),
        "--nprobe",
        str(nprobe),
    ]
    return subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


def start_serve(model_dir: Path, port: int, exact_max_ads: int, nprobe: int) -> dict:
    """Deploy the app with one replica per deployment (two cores); return GET /model."""
    from ray import serve

    from serve.app import build_app
    from serve.schemas import AppArgs

    single = {"min_replicas": 1, "max_replicas": 1}
    args = AppArgs(
        model_dir=str(model_dir),
        user_encoder=single,
        ingress=single,
        ranker=single,
        ad_index={**single, "exact_max_ads": exact_max_ads, "nprobe": nprobe},
        deadline_ms=5000,
    )
    serve.run(build_app(args), name="adrec", route_prefix="/", logging_config={"enable_access_log": False})
    wait_until_ok(f"http://127.0.0.1:{port}/healthz", timeout_s=300, interval_s=0.5)
    return httpx.get(f"http://127.0.0.1:{port}/model", timeout=60).json()


def measure(url: str, bodies: list[dict], concurrencies: list[int], seconds: float, warmup_s: float) -> dict[int, dict]:
    return {c: asyncio.run(closed_loop(url, bodies, c, seconds, warmup_s)) for c in concurrencies}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=str(REPO / "runs/synthetic/models"), help="an exported version or registry root")
    parser.add_argument("--catalogs", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--exact-max-ads", type=int, default=50_000)
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--work-dir", default="/tmp/adrec-serve-bench")
    parser.add_argument(
        "--latency-mode",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="RAY_SERVE_THROUGHPUT_OPTIMIZED for the embedded Ray, as adrec.runtime.init_ray sets it",
    )
    parser.add_argument("--bare-server", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    options = parser.parse_args()

    if options.bare_server:  # the child process of start_bare
        import uvicorn

        uvicorn.run(
            bare_app(options.bare_server, options.exact_max_ads, options.nprobe),
            host="127.0.0.1",
            port=options.port,
            log_level="warning",
            access_log=False,
        )
        return

    import ray
    from ray import serve

    from serve.app import shutdown

    os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1" if options.latency_mode else "0"  # read when Ray starts
    source = resolve_model_dir(options.model_dir)
    verify_manifest(source)
    work = Path(options.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)  # stdout is the JSON
    serve_port, runs, indexes = free_port(), [], {}
    serve.start(http_options={"host": "127.0.0.1", "port": serve_port})
    rng = np.random.default_rng(0)
    for size in options.catalogs:
        started = time.perf_counter()
        version = derive_version(source, size, work)
        print(f"catalog {size}: {version} ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
        bodies = request_bodies(version, 2000, rng)

        info = start_serve(version, serve_port, options.exact_max_ads, options.nprobe)
        indexes[size] = info["index"]
        served = measure(f"http://127.0.0.1:{serve_port}/recommend", bodies, options.concurrency, options.seconds, options.warmup_s)
        shutdown("adrec")

        bare_port = free_port()
        bare = start_bare(version, bare_port, options.exact_max_ads, options.nprobe)
        try:
            wait_until_ok(f"http://127.0.0.1:{bare_port}/healthz", timeout_s=300, interval_s=0.5)
            baseline = measure(f"http://127.0.0.1:{bare_port}/recommend", bodies, options.concurrency, options.seconds, options.warmup_s)
        finally:
            bare.terminate()
            bare.wait()
        for c in options.concurrency:
            s, b = served[c], baseline[c]
            runs.append(
                {
                    "catalog": size,
                    "concurrency": c,
                    **s,
                    "bare_p50_ms": b["p50_ms"],
                    "bare_p99_ms": b["p99_ms"],
                    "bare_qps": b["qps"],
                    "bare_failed": b["failed"],
                    "ratio_p50": round(s["p50_ms"] / b["p50_ms"], 2),
                }
            )
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    with contextlib.redirect_stdout(sys.stderr):  # Ray prints a shutdown notice to stdout; stdout is for the JSON
        serve.shutdown()
        ray.shutdown()
    ivf = [i for i in indexes.values() if i.get("recall")]
    print(
        json.dumps(
            {
                "runs": runs,
                "ann_recall_at_100": ivf[-1]["recall"]["recall"] if ivf else None,
                "indexes": {str(size): info for size, info in indexes.items()},
                "seconds_per_run": options.seconds,
                "latency_mode": options.latency_mode,
                "cpus": os.cpu_count(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
