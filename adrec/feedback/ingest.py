"""Feedback ingestion, without Serve: a token for each served ad, and posted events -> log records.

The ingress signs every ad of a /recommend answer with ``sign_answer`` and turns a
POST /feedback batch into segment records (adrec.feedback.log) with ``events_to_records``;
compaction (adrec.feedback.compact) turns the records into rows of the behaviour log.

An event is any object with the attributes of serve.schemas.FeedbackEvent (a pydantic
model there; a dataclass or SimpleNamespace in tests): ``event_id``, ``event``
("impression" | "click" | "conversion"), ``user_id``, ``token`` and ``ts`` (seconds since
the epoch, or None for "when received").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from adrec.feedback.tokens import Impression, Signer, TokenError
from adrec.recommend import user_key


class ServedAd(Protocol):  # adrec.auction.Winner
    ad_id: str
    propensity: float


class FeedbackEvent(Protocol):
    event_id: str
    event: str
    user_id: str
    token: str
    ts: float | None


def impression_token(
    signer: Signer,
    request_id: str,
    user_id: str,
    ad_id: str,
    version: str,
    context: Mapping[str, str],
    propensity: float,
    now: float,
) -> str:
    """The token of ``ad_id`` served at ``now`` in answer to ``request_id``.

    ``context`` is the request's context as the ingress accepted it (only fields the serving
    model declares): the token carries all of it, so compaction can log every field.
    """
    return signer.sign(Impression(request_id, user_key(user_id), ad_id, version, now, dict(context), propensity))


def sign_answer(
    signer: Signer | None,
    request_id: str,
    user_id: str,
    version: str,
    context: Mapping[str, str],
    ads: Sequence[ServedAd],
    now: float,
) -> list[str | None]:
    """The token of each of ``ads`` (in order), served together at ``now``; all None when
    feedback is off (no signer)."""
    if signer is None:
        return [None] * len(ads)
    return [impression_token(signer, request_id, user_id, ad.ad_id, version, context, ad.propensity, now) for ad in ads]


def feedback_record(impression: Impression, event: FeedbackEvent, now: float) -> dict:
    """One segment record: what the token proves was served, and what the client says happened."""
    return {
        **vars(impression),
        "served_ts": impression.ts,
        "impression_id": impression.impression_id,
        "event_id": event.event_id,
        "event": event.event,
        "user_id": event.user_id,
        "ts": event.ts if event.ts is not None else now,
    }


def events_to_records(signer: Signer, events: Sequence[FeedbackEvent], now: float) -> tuple[list[dict], list[dict]]:
    """(records of the events whose tokens verify, refusals of the others).

    A token must verify (signature, format, not older than the signer's ttl at ``now``) and
    have been issued to the event's own user. A refusal is a validation item naming the
    event, ``{"loc": ["body", "events", i, "token"], "msg": why, "type": "invalid_token"}``;
    the ingress answers 403 with them and logs nothing when there is any.
    """
    records, refused = [], []
    for i, event in enumerate(events):
        try:
            impression = signer.verify(event.token, now)
            if impression.user != user_key(event.user_id):
                raise TokenError("the token was issued for another user")
        except TokenError as failure:
            refused.append({"loc": ["body", "events", i, "token"], "msg": str(failure), "type": "invalid_token"})
            continue
        records.append(feedback_record(impression, event, now))
    return records, refused
