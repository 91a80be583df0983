"""Signed impression tokens: proof that an ad was served, which a click must carry.

Every ad in a /recommend answer carries a token, an HMAC-SHA256 over what was served:
request id, the user's digest, ad, model version and time, the request's context (every
context field the serving model declares, e.g. {"slot": "top"}: the page view the ad was shown
in, so compaction can log it) and the propensity with which it was chosen, for off-policy
estimates. A click or conversion posted
to /feedback must carry a valid, unexpired token, so clicks can only refer to served ads, and
a forged or edited token is refused.

Format: ``base64url(json payload) "." base64url(mac)``. The payload holds the user's digest,
never the raw id; feedback events state the user id, checked against the digest.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import asdict, dataclass, field


class TokenError(ValueError):
    """A token that is malformed, forged, edited or expired."""


@dataclass(frozen=True)
class Impression:
    request_id: str
    user: str  # adrec.recommend.user_key(user_id): a digest
    ad_id: str
    version: str
    ts: float  # seconds since the epoch, when served
    # The request's context fields, raw ({"slot": "top", "device": "mobile"}); never mutated.
    context: dict[str, str] = field(default_factory=dict)
    propensity: float = 1.0  # probability the serving policy gave this ad this slot

    @property
    def impression_id(self) -> str:
        """The served impression's id in the behaviour log; clicks name it in ``impression_id``."""
        return f"{self.request_id}:{self.ad_id}"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Signer:
    """Signs and verifies impression tokens with one secret; ``ttl_s`` bounds how late feedback may come."""

    def __init__(self, secret: bytes, ttl_s: float) -> None:
        if len(secret) < 16:
            raise ValueError("the feedback secret must be at least 16 bytes; set a long random ADREC_FEEDBACK_SECRET")
        self.secret = secret
        self.ttl_s = ttl_s

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self.secret, payload, hashlib.sha256).digest()

    def sign(self, impression: Impression) -> str:
        payload = json.dumps(asdict(impression), separators=(",", ":"), sort_keys=True).encode()
        return f"{b64(payload)}.{b64(self._mac(payload))}"

    def verify(self, token: str, now: float) -> Impression:
        """The impression ``token`` proves, or TokenError saying why it proves nothing."""
        try:
            payload_text, mac_text = token.split(".")
            payload, mac = unb64(payload_text), unb64(mac_text)
        except (ValueError, TypeError):
            raise TokenError("malformed token: expected the token from a /recommend answer") from None
        if not hmac.compare_digest(mac, self._mac(payload)):
            raise TokenError("invalid token: its signature does not match (forged or edited)")
        try:
            impression = Impression(**json.loads(payload))
        except TypeError:  # signed with this secret, but with other fields: a token of an older format
            raise TokenError("outdated token: issued in an older format; use the token of a current /recommend answer") from None
        if now - impression.ts > self.ttl_s:
            raise TokenError(f"expired token: served {now - impression.ts:.0f} s ago, feedback is accepted for {self.ttl_s:.0f} s")
        return impression
