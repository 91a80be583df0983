"""The repository's own checks, so the test command (and CI) fails on them: lint, format and the
import contracts of pyproject.toml, run as the pre-commit hooks run them."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOLS = Path(sys.executable).parent  # ruff, lint-imports and pre-commit come with the test extra


def run(*command: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{TOOLS}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONPATH": str(cwd)}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_pre_commit_hooks_pass_on_every_file():
    if shutil.which("git") is None or run("git", "rev-parse", "--git-dir").returncode != 0:
        pytest.skip("pre-commit needs a git checkout; this copy of the source is not one")
    result = run(str(TOOLS / "pre-commit"), "run", "--all-files", "--show-diff-on-failure")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_a_library_module_importing_the_server_breaks_the_import_contract(tmp_path):
    """The contract is live: the checker reports a forbidden import, not only a clean tree."""
    for name in ("adrec", "serve"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    (tmp_path / "adrec" / "_contract_probe.py").write_text("import serve.app  # noqa: F401\n")
    result = run(str(TOOLS / "lint-imports"), cwd=tmp_path)
    assert result.returncode != 0 and "adrec._contract_probe -> serve.app" in result.stdout, result.stdout[-2000:]
