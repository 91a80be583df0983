"""One error shape for every answer that is not 2xx, FastAPI's validation-error shape:

    {"detail": [{"loc": ["body", "attributes", "category"], "msg": "missing: ...", "type": "missing"}]}

``loc`` says where (``body``, ``path`` or ``header``, then the field's path; ``[]`` for the
request as a whole), ``msg`` what to fix, ``type`` the kind, for code. The handlers here turn
FastAPI's and Starlette's own errors (422, 400, 404, 405) into it, without echoing the input
back (a request may hold personal data), and ``responses`` documents it in the OpenAPI document.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("ray.serve")

# The kind of error a bare status stands for, when the raiser gave only a message.
KINDS = {
    400: "unparseable_body",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    500: "internal",
    503: "unavailable",
}

WHEN = {
    400: "The body could not be read (for example, bytes that are not UTF-8).",
    401: "A valid `Authorization: Bearer <token>` header is required.",
    403: "Refused: the endpoint is switched off, or a feedback token is forged, edited, expired or another user's.",
    404: "No such version in the registry.",
    413: "The body is larger than max_body_bytes.",
    422: "A field is missing, unknown or out of range; `loc` names it.",
    503: "No answer within the deadline (deadline_ms, or the request's tmax_ms), or the feature is off: serve a fallback and retry later.",
}


class ErrorItem(BaseModel):
    loc: list[str | int] = Field(description="where: body, path or header, then the field's path; [] for the whole request")
    msg: str = Field(description="what is wrong and what to do")
    type: str = Field(description="the kind of error, for code: missing, extra_forbidden, unauthorized, deadline, ...")


class ErrorBody(BaseModel):
    detail: list[ErrorItem]


def error(status: int, msg: str, kind: str, loc: tuple | list = (), headers: dict | None = None) -> HTTPException:
    """An HTTPException whose body has the one error shape."""
    return HTTPException(status, detail=[{"loc": list(loc), "msg": msg, "type": kind}], headers=headers)


def responses(*statuses: int) -> dict:
    """The OpenAPI ``responses`` of an endpoint's error statuses, each with the one shape."""
    return {status: {"model": ErrorBody, "description": WHEN[status]} for status in statuses}


def body(detail: list[dict]) -> dict:
    return {"detail": [{"loc": list(d.get("loc", [])), "msg": str(d.get("msg", "")), "type": str(d.get("type", "error"))} for d in detail]}


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    detail = exc.detail if isinstance(exc.detail, list) else [{"loc": [], "msg": str(exc.detail), "type": KINDS.get(exc.status_code, "error")}]
    return JSONResponse(body(detail), status_code=exc.status_code, headers=exc.headers)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(body(exc.errors()), status_code=422)


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("adrec: %s %s failed", request.method, request.url.path)
    return JSONResponse(body([{"loc": [], "msg": "internal error; the app's log has the details", "type": "internal"}]), status_code=500)


def install(api: FastAPI) -> None:
    """Route every error of ``api`` through the one shape."""
    api.add_exception_handler(StarletteHTTPException, http_error)
    api.add_exception_handler(RequestValidationError, validation_error)
    api.add_exception_handler(Exception, internal_error)
