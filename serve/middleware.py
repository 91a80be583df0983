"""ASGI middleware of the ingress: the request body limit, applied before any parsing."""

from __future__ import annotations

import json

from serve.errors import error


class BodyLimit:
    """413 for bodies over ``app.state.max_body_bytes``, whether declared (Content-Length) or streamed."""

    def __init__(self, app, default_limit: int = 65_536) -> None:
        self.app = app
        self.default_limit = default_limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = getattr(scope["app"].state, "max_body_bytes", self.default_limit) if "app" in scope else self.default_limit
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await reject(send, limit)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:  # an HTTPException, so FastAPI's body parsing passes it on as it is
                raise error(413, too_large_message(limit), "too_large", ["body"])
            return message

        await self.app(scope, counted, send)


def too_large_message(limit: int) -> str:
    return f"request body over {limit} bytes (max_body_bytes)"


async def reject(send, limit: int) -> None:
    body = json.dumps({"detail": [{"loc": ["body"], "msg": too_large_message(limit), "type": "too_large"}]}).encode()
    await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})
