"""What every replica of a Serve app must agree on, held in one place.

* the model version being served, and one being rolled out: a new version is promoted only
  when every live replica has loaded it, so no request ever waits on a load or meets a
  replica that cannot answer for its version;
* the log of ad updates (``PUT /ads/{ad_id}``), applied in order by every index and ranker
  replica, so their catalog rows agree.

Serve runs it as one named Ray actor, whose methods run one at a time; replicas poll it
(a heartbeat) and carry the version and update count in each request.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from adrec.ads import AdUpdate


@dataclass
class Replica:
    deployment: str
    last_seen: float
    loaded: set[str] = field(default_factory=set)


class ServingState:
    """Versions are exported model directories (absolute paths of version folders)."""

    def __init__(self, model_dir: str, live_s: float = 3.0, clock: Callable[[], float] = time.time) -> None:
        self.serving = model_dir
        self.configured = model_dir  # the app's own args.model_dir
        self.previous: str | None = None
        self.target: str | None = None
        self.updates: list[AdUpdate] = []
        self.replicas: dict[str, Replica] = {}
        self.live_s = live_s
        self.clock = clock

    def poll(self, replica: str, deployment: str, loaded: list[str]) -> dict:
        """A replica's heartbeat: what it has loaded; returns what it should hold and apply."""
        self.replicas[replica] = Replica(deployment, self.clock(), set(loaded))
        self._promote_when_ready()
        return self.view()

    def view(self) -> dict:
        return {"serving": self.serving, "previous": self.previous, "target": self.target, "updates": len(self.updates)}

    def configure(self, model_dir: str) -> dict:
        """A starting replica's configured version. The state outlives replicas, so a restart keeps
        serving what a reload chose; a config naming another version (a redeploy) rolls it out."""
        if model_dir != self.configured:
            self.configured = model_dir
            self.begin_rollout(model_dir)
        return self.view()

    def begin_rollout(self, model_dir: str) -> dict:
        """Start loading ``model_dir`` everywhere; it serves once every live replica holds it."""
        self.target = None if model_dir == self.serving else model_dir
        self._promote_when_ready()
        return self.view()

    def _promote_when_ready(self) -> None:
        if self.target is None:
            return
        live = self.live_replicas()
        if live and all(self.target in r.loaded for r in live):
            self.previous, self.serving, self.target = self.serving, self.target, None

    def live_replicas(self) -> list[Replica]:
        """Replicas heard from within ``live_s``; a killed one stops counting once it falls silent."""
        now = self.clock()
        self.replicas = {name: r for name, r in self.replicas.items() if now - r.last_seen <= self.live_s}
        return list(self.replicas.values())

    def add_ad(self, update: AdUpdate) -> int:
        """Log one ad update; returns the count of updates, which replicas must have applied to see it."""
        self.updates.append(update)
        return len(self.updates)

    def ads_since(self, applied: int, upto: int | None = None) -> list[AdUpdate]:
        return self.updates[applied:upto]

    def status(self) -> dict:
        live = self.live_replicas()
        deployments: dict[str, int] = {}
        for r in live:
            deployments[r.deployment] = deployments.get(r.deployment, 0) + 1
        return {**self.view(), "live_replicas": deployments}
