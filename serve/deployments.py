"""The three model deployments behind the ingress, each holding one side of the serving version.

    UserEncoder (autoscaling, @serve.batch)   features -> U = user tower(features)
    AdIndex                                   U -> shortlist by U . V (exact, or FAISS IVF), + popular ads for cold users
    Ranker                                    shortlist -> calibrated pCTR (the DCN ranker), ranked by pCTR x bid

Each keeps its versions in step with the app's ServingState actor (serve/versions.py); the
model code itself is adrec.recommend's, which runs the same without Serve.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from ray import serve

from adrec.recommend import RankingSide, RetrievalSide, UserSide
from serve.versions import Versions, state_actor


# Helpers the deployments call stand above them: Serve pickles a deployment's class when it is
# decorated, with the module globals that exist by then.
def one_thread() -> None:
    # Many replicas share two cores; intra-op threads per replica only fight each other.
    torch.set_num_threads(1)


def timed(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


def app_state(model_dir: str):
    return state_actor(serve.get_replica_context().app_name, model_dir)


@serve.deployment
class UserEncoder:
    """The user tower, batched across concurrent requests."""

    def __init__(self, model_dir: str, max_batch_size: int, batch_wait_timeout_s: float, poll_s: float) -> None:
        one_thread()
        self.versions = Versions("user_encoder", UserSide, app_state(model_dir), poll_s)
        self.versions.start(model_dir)
        self.encode.set_max_batch_size(max_batch_size)
        self.encode.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch
    async def encode(self, features: list[dict[str, np.ndarray]], model_dirs: list[str]) -> list[tuple[np.ndarray, dict]]:
        """Each call's features (b_i rows) are encoded in one pass per version and split back: ((b_i, D), timing)."""
        started = time.perf_counter()
        out: list = [None] * len(features)
        for model_dir in set(model_dirs):
            calls = [i for i, d in enumerate(model_dirs) if d == model_dir]
            side = await self.versions.get(model_dir, 0)
            merged = {name: np.concatenate([features[i][name] for i in calls]) for name in side.tower.feature_names}
            users = np.split(side.encode(merged), np.cumsum([len(features[i]["user_id"]) for i in calls])[:-1])
            for i, user in zip(calls, users):
                out[i] = user
        timing = {"encode": timed(started), "batch": len(features)}
        return [(user, timing) for user in out]


@serve.deployment
class AdIndex:
    """The ad index of the serving version: the shortlist by U . V; new ads embedded on arrival."""

    def __init__(self, model_dir: str, index_options: dict, popular: int, poll_s: float) -> None:
        one_thread()
        self.versions = Versions("ad_index", lambda d: RetrievalSide(d, index_options, popular), app_state(model_dir), poll_s)
        self.versions.start(model_dir)

    async def shortlist(self, encoded: tuple[np.ndarray, dict], n: int, cold: bool, model_dir: str, updates: int):
        """U (1, D) from the encoder -> (rows (n',), U . V (n',), timing)."""
        user, timing = encoded
        side = await self.versions.get(model_dir, updates)
        started = time.perf_counter()
        ((rows, scores),) = side.shortlist(user, n, [cold])
        return rows, scores, {**timing, "index": timed(started)}

    async def describe(self, model_dir: str, updates: int, ad_id: str | None = None) -> dict:
        side = await self.versions.get(model_dir, updates)
        index = side.index
        info = {"kind": index.kind, "size": index.size, "recall": index.recall, "updates": side.updates.report()}
        if ad_id is not None:
            info["ad_row"] = side.catalog.row_of.get(ad_id)
        return info


@serve.deployment
class Ranker:
    """Calibrated pCTR of every shortlisted ad, and the auction's view of them."""

    def __init__(self, model_dir: str, poll_s: float) -> None:
        one_thread()
        self.versions = Versions("ranker", RankingSide, app_state(model_dir), poll_s)
        self.versions.start(model_dir)

    async def rank(self, features: dict[str, np.ndarray], shortlist, model_dir: str, updates: int):
        """The index's shortlist -> (adrec.auction.Shortlist ranked by pCTR x bid, timing)."""
        rows, scores, timing = shortlist
        side = await self.versions.get(model_dir, updates)
        started = time.perf_counter()
        ranked = side.shortlist(features, rows, scores)
        return ranked, {**timing, "rank": timed(started)}

    async def describe(self, model_dir: str, updates: int) -> dict:
        return {"updates": (await self.versions.get(model_dir, updates)).updates.report()}
