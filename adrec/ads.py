"""An ad as an advertiser states it online (``PUT /ads/{ad_id}``): its complete check against a
model version's feature map, and its encoding with the training transforms.

The check is a pure function of (feature map, update), so every replica of a version reaches
the same verdict on the same update: the ingress refuses a bad ad before it is logged, and an
index or ranker replica that meets one anyway (logged by an older version, or written straight
into the serving state) skips it exactly as its peers do, so their catalog rows stay aligned.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from adrec.features import NUMBER, FeatureMap, FeatureSpec

MAX_ID_LENGTH = 256
MAX_LIST = 64  # values of one list attribute (e.g. tokens)
FLOAT32_MAX = float(np.finfo(np.float32).max)
MAX_BID = 1e9  # far above any real bid, far below float32's limit: the catalog stores bids as float32
REJECTIONS_KEPT = 20  # the latest skipped updates a reader reports (GET /model); the count covers all
logger = logging.getLogger(__name__)


@dataclass
class AdUpdate:
    """A new or changed ad as the advertiser states it: raw values, encoded by each model version."""

    ad_id: str
    campaign_id: str
    bid: float
    attributes: dict[str, str | list[str]] = field(default_factory=dict)  # e.g. {"category": "cat3", "tokens": ["shoes"]}

    def raw_table(self) -> pa.Table:
        columns = {"ad_id": [self.ad_id], "campaign_id": [self.campaign_id]}
        for name, value in self.attributes.items():
            columns[name] = [value]
        return pa.table(columns)


class AdUpdateError(ValueError):
    """An ad update a model version cannot encode; ``problems`` name each field, as 422 bodies do."""

    def __init__(self, problems: list[dict]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{'.'.join(map(str, p['loc']))}: {p['msg']}" for p in problems))


def problem(loc: tuple, msg: str, kind: str) -> dict:
    """One error item: where (relative to the ad), what is wrong, and a machine-readable type."""
    return {"loc": list(loc), "msg": msg, "type": kind}


def ad_input_specs(feature_map: FeatureMap) -> dict[str, FeatureSpec]:
    """{raw column: its spec} of what an ad states besides its id and campaign (e.g. advertiser_id, category, tokens)."""
    return {f.column: f for f in feature_map.features if f.group == "ad" and f.column not in ("ad_id", "campaign_id")}


def check_id(loc: str, value) -> list[dict]:
    if not isinstance(value, str) or not value:
        return [problem((loc,), "must be a non-empty string", "string_type")]
    if len(value) > MAX_ID_LENGTH:
        return [problem((loc,), f"{len(value)} characters; at most {MAX_ID_LENGTH}", "string_too_long")]
    return []


def check_bid(bid) -> list[dict]:
    if isinstance(bid, bool) or not isinstance(bid, (int, float)) or not 0 < bid <= MAX_BID:  # NaN fails too
        return [problem(("bid",), f"must be a number above 0 and at most {MAX_BID:g}, got {bid!r}", "value_error")]
    return []


def is_number(value) -> bool:
    """A number, or a numeric string, that float32 model inputs hold (no inf, NaN or overflow)."""
    if isinstance(value, str) and re.match(NUMBER, value):
        value = float(value)
    return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= FLOAT32_MAX


def check_value(spec: FeatureSpec, value) -> str | None:
    """Why ``value`` cannot feed ``spec``, or None. Lists feed sequences; text may be a string or its words."""
    if isinstance(value, list):
        if spec.kind != "sequence":
            return f"a {spec.kind} input takes one value, not a list"
        if len(value) > MAX_LIST:
            return f"{len(value)} values; at most {MAX_LIST}"
        if not all(isinstance(v, str) and len(v) <= MAX_ID_LENGTH for v in value):
            return f"every value must be a string of at most {MAX_ID_LENGTH} characters"
        return None
    if spec.kind == "sequence" and not spec.tokenize:
        return "a sequence input takes a list of values"
    if spec.kind in ("bucket", "dense"):
        return None if is_number(value) else f"a {spec.kind} input takes a finite number, got {value!r}"
    if not isinstance(value, str) or len(value) > MAX_ID_LENGTH:
        return f"must be a string of at most {MAX_ID_LENGTH} characters"
    return None


def check_ad_update(feature_map: FeatureMap, update: AdUpdate) -> list[dict]:
    """Every problem that stops ``feature_map`` from encoding ``update`` (empty: it encodes).

    Each ad-tower and ranker input the map declares must be stated; no input may be unknown.
    """
    found = check_id("ad_id", update.ad_id) + check_id("campaign_id", update.campaign_id) + check_bid(update.bid)
    attributes = update.attributes if isinstance(update.attributes, dict) else {}
    if not isinstance(update.attributes, dict):
        found.append(problem(("attributes",), "must be an object of attribute names to values", "dict_type"))
    specs = ad_input_specs(feature_map)
    for name, value in attributes.items():
        if name not in specs:
            found.append(problem(("attributes", name), f"unknown ad attribute; this model knows {sorted(specs)}", "extra_forbidden"))
        elif (why := check_value(specs[name], value)) is not None:
            found.append(problem(("attributes", name), why, "value_error"))
    for name in sorted(set(specs) - set(attributes)):
        found.append(problem(("attributes", name), f"missing: this model's ad tower and ranker need {sorted(specs)}", "missing"))
    return found


def encode_ad(feature_map: FeatureMap, update: AdUpdate) -> dict[str, np.ndarray]:
    """One checked ad's model inputs with the training transforms: (1,) ids, (1, L) sequences.

    Raises AdUpdateError naming every problem when the map cannot encode it.
    """
    problems = check_ad_update(feature_map, update)
    if problems:
        raise AdUpdateError(problems)
    return feature_map.encode(update.raw_table())


class UpdateReader:
    """How far one side has read the serving state's ad log, and the updates it had to skip.

    An update the feature map cannot encode is skipped, and so is one whose write fails: a
    side that stopped at it would fail every later request that needs the log's count. The
    check is deterministic, so every replica of a version skips the same updates and their
    catalog rows stay aligned.
    """

    def __init__(self, feature_map: FeatureMap, deployment: str) -> None:
        self.feature_map = feature_map
        self.deployment = deployment
        self.applied = 0  # log entries read, applied or skipped, in the log's order
        self.rejected_count = 0
        self.rejected: list[dict] = []  # the latest REJECTIONS_KEPT: {position, ad_id, reason}

    def read(self, updates: list[AdUpdate], write) -> None:
        """``write(update, encoded)`` each update that encodes, in order; skip and record the rest."""
        for update in updates:
            self.applied += 1
            try:
                write(update, encode_ad(self.feature_map, update))
            except Exception as error:  # noqa: BLE001 - any bad entry, whatever it breaks, is skipped, never retried forever
                self.reject(update, error)

    def reject(self, update: AdUpdate, error: Exception) -> None:
        ad_id = getattr(update, "ad_id", None)
        reason = f"{type(error).__name__}: {error}"[:500]
        logger.warning("adrec %s: skipped ad update %d (ad %r): %s", self.deployment, self.applied, ad_id, reason)
        self.rejected_count += 1
        self.rejected = [*self.rejected, {"position": self.applied, "ad_id": str(ad_id)[:256], "reason": reason}][-REJECTIONS_KEPT:]

    def report(self) -> dict:
        return {"applied": self.applied, "rejected": self.rejected_count, "latest_rejected": self.rejected}
