"""The cluster path: `ray job submit` of jobs/train.py to a real two-node Ray cluster.

The test starts its own cluster (`ray start --head`, then a second `ray start --address=...`)
on free ports beside the test session's Ray, submits a short training job, checks what the job
wrote, and stops only the processes it started.
"""

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from adrec.registry import load_checkpoint
from adrec.runtime import read_json
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def start_node(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    # --block: the command owns the node's processes and stops them all on SIGTERM.
    return subprocess.Popen([RAY, "start", "--block", *args], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def stop_node(node: subprocess.Popen) -> None:
    node.send_signal(signal.SIGTERM)
    try:
        node.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(node.pid, signal.SIGKILL)
        node.wait()


def session_processes(gcs_port: int) -> list[str]:
    """Command lines of processes that belong to the cluster at ``gcs_port``."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        line = " ".join(proc.info["cmdline"] or [])
        if f":{gcs_port}" in line or f"--port={gcs_port}" in line:
            found.append(line[:120])
    return found


@pytest.fixture
def cluster(tmp_path):
    gcs, dashboard = free_port(), free_port()
    env = {**os.environ, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "1"}
    head = start_node(
        [
            "--head",
            f"--port={gcs}",
            "--num-cpus=2",
            "--include-dashboard=true",
            f"--dashboard-port={dashboard}",
            f"--dashboard-agent-listen-port={free_port()}",
        ],
        env,
        tmp_path / "head.log",
    )
    worker = None
    try:
        address = f"http://127.0.0.1:{dashboard}"
        wait_for_jobs_api(address, head, tmp_path / "head.log")
        worker = start_node(
            [f"--address=127.0.0.1:{gcs}", "--num-cpus=2", f"--dashboard-agent-listen-port={free_port()}"], env, tmp_path / "worker.log"
        )
        wait_for_nodes(gcs, 2)
        yield {"address": address, "env": env}
    finally:
        for node in (worker, head):
            if node is not None:
                stop_node(node)
        # `ray start` records the cluster for later ray.init() calls; a stopped one must not linger there.
        recorded = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if recorded.exists() and recorded.read_text().strip().endswith(f":{gcs}"):
            recorded.unlink()
    assert not session_processes(gcs), "processes of the test cluster outlived it"


def wait_for_jobs_api(address: str, head: subprocess.Popen, log: Path, timeout_s: float = 90) -> None:
    import httpx

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start --head exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{address}/api/version", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"the head's job API at {address} did not come up in {timeout_s} s")


def wait_for_nodes(gcs_port: int, count: int, timeout_s: float = 180) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        out = subprocess.run([RAY, "status", f"--address=127.0.0.1:{gcs_port}"], capture_output=True, text=True).stdout
        if out.count("node_") >= count:
            return
        time.sleep(2)
    raise TimeoutError(f"the cluster did not reach {count} nodes")


def test_train_job_submitted_to_a_two_node_cluster(tiny_run, cluster, tmp_path):
    run_dir = tmp_path / "job-run"
    submit = [
        RAY,
        "job",
        "submit",
        "--address",
        cluster["address"],
        "--working-dir",
        str(REPO),
        "--",
        sys.executable,
        "jobs/train.py",
        f"run_dir={run_dir}",
        f"paths.prepared_dir={tiny_run['cfg'].paths.prepared_dir}",
        "trainer.num_workers=2",
        "trainer.cpus_per_worker=1",
        "trainer.placement_strategy=SPREAD",
        "trainer.epochs=1",
        "trainer.batch_size=512",
    ]
    done = subprocess.run(submit, env=cluster["env"], capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout + done.stderr

    result = read_json(run_dir / "train" / "result.json")
    assert result["workers"] == 2 and result["global_batch_size"] == 2 * 512
    assert result["best"]["val_auc"] > 0.55
    load_checkpoint(result["best_checkpoint"])
