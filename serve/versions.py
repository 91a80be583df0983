"""Each replica's copy of the model versions it serves, kept in step with the app's ServingState actor.

A background task polls the state (the replica's heartbeat): it loads a version being rolled
out in a worker thread while requests keep flowing on the current one, drops versions no
longer needed, and applies logged ad updates. Requests name the version and update count
they need, so a replica that is behind catches up before answering instead of answering wrong.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Generic, TypeVar

import ray
from ray import serve
from ray.util.metrics import Counter

from adrec.serving_state import ServingState

logger = logging.getLogger("ray.serve")
Side = TypeVar("Side")
STATE_NAMESPACE = "adrec"


def state_actor(app_name: str, model_dir: str):
    """The app's ServingState actor, created by whichever replica starts first.

    Detached, so replica restarts keep the serving version and the ad log; ``serve.app.shutdown``
    removes it with the app.
    """
    remote = ray.remote(num_cpus=0, max_restarts=-1)(ServingState)
    return remote.options(name=f"{app_name}-state", namespace=STATE_NAMESPACE, lifetime="detached", get_if_exists=True).remote(model_dir)


class Versions(Generic[Side]):
    """{model_dir: side} for one replica; ``load(model_dir)`` builds a side (seconds; run in a thread)."""

    def __init__(self, deployment: str, load: Callable[[str], Side], state, poll_s: float = 0.5) -> None:
        self.deployment = deployment
        self.load = load
        self.state = state
        self.poll_s = poll_s
        self.sides: dict[str, Side] = {}
        self.loading: dict[str, asyncio.Task] = {}
        self.view: dict = {}
        self.locks: dict[str, asyncio.Lock] = {}
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside a replica (local testing): one name is enough
            self.replica = f"{deployment}-local"
        self.poller: asyncio.Task | None = None
        self._rejections: Counter | None = None

    def start(self, model_dir: str) -> None:
        """Load the serving version now (the replica is not ready before), then poll in the background."""
        self.view = ray.get(self.state.configure.remote(model_dir))
        serving = self.view["serving"]
        self.sides[serving] = self.load(serving)
        self.catch_up_now(serving, self.view["updates"])

    def catch_up_now(self, model_dir: str, updates: int) -> None:
        side = self.sides[model_dir]
        if hasattr(side, "apply") and side.applied < updates:
            self._apply(side, ray.get(self.state.ads_since.remote(side.applied, updates)))

    def _apply(self, side, updates: list) -> None:
        """Apply logged ad updates; the ones this version cannot encode are skipped and counted."""
        rejected = side.updates.rejected_count
        side.apply(updates)
        if side.updates.rejected_count > rejected:
            self.rejections().inc(side.updates.rejected_count - rejected)

    def rejections(self) -> Counter:
        if self._rejections is None:  # made on first use: a metric needs a running Ray worker
            self._rejections = Counter(
                "adrec_ad_updates_rejected", "ad updates a replica skipped because its model version cannot encode them", tag_keys=("deployment",)
            ).set_default_tags({"deployment": self.deployment})
        return self._rejections

    def ensure_polling(self) -> None:
        if self.poller is None or self.poller.done():
            self.poller = asyncio.get_running_loop().create_task(self._poll_forever())

    async def _poll_forever(self) -> None:
        while True:
            try:
                await self.poll_once()
            except Exception:  # a failed poll must not stop the heartbeat; the next one retries
                logger.exception("adrec: polling the serving state failed")
            await asyncio.sleep(self.poll_s)

    async def poll_once(self) -> None:
        self.view = await self.state.poll.remote(self.replica, self.deployment, list(self.sides))
        wanted = {v for v in (self.view["serving"], self.view["previous"], self.view["target"]) if v}
        for model_dir in wanted - set(self.sides):
            await self.get(model_dir, self.view["updates"])
        for model_dir in set(self.sides) - wanted:
            del self.sides[model_dir]
        for model_dir in list(self.sides):
            await self._apply_updates(model_dir, self.view["updates"])

    async def get(self, model_dir: str, updates: int) -> Side:
        """The side for ``model_dir`` with at least ``updates`` ad updates applied, loading it if needed."""
        self.ensure_polling()
        if model_dir not in self.sides:
            if model_dir not in self.loading:
                self.loading[model_dir] = asyncio.get_running_loop().create_task(self._load(model_dir))
            await asyncio.shield(self.loading[model_dir])
        await self._apply_updates(model_dir, updates)
        return self.sides[model_dir]

    async def _load(self, model_dir: str) -> None:
        try:
            self.sides[model_dir] = await asyncio.to_thread(self.load, model_dir)
        finally:
            self.loading.pop(model_dir, None)

    async def _apply_updates(self, model_dir: str, updates: int) -> None:
        side = self.sides.get(model_dir)
        if side is None or not hasattr(side, "apply"):
            return
        async with self.locks.setdefault(model_dir, asyncio.Lock()):  # one fetch-and-apply at a time, in log order
            if side.applied < updates:
                self._apply(side, await self.state.ads_since.remote(side.applied, updates))

    def serving(self) -> str:
        return self.view.get("serving")
