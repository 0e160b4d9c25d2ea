"""What a request must pass before it may cost anything: the token, the media type,
the body's size (checked before the body is in memory), well-formed UTF-8 JSON, and
a work budget counted in network evaluations.

Every refusal is a :class:`Refusal` with a 4xx status and a reason; nothing a client
sends can make these checks fail any other way.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

from fastapi.responses import JSONResponse

from serving.sampler import SampleJob

MAX_BODY_BYTES = 256 * 1024  # a maximal valid request is a few KiB
TOKEN_ENV = "LDM_API_TOKEN"


class Refusal(Exception):
    """A request refused before sampling: HTTP ``status`` and a reason for the client."""

    def __init__(
        self,
        status: int,
        detail: str,
        errors: list[dict[str, str]] | None = None,
        headers: Mapping[str, str] | None = None,
    ):
        super().__init__(detail)
        self.status, self.detail = status, detail
        self.errors, self.headers = errors or [], dict(headers or {})

    def response(self) -> JSONResponse:
        return error_response(self.status, self.detail, self.errors, self.headers)


class _AsciiJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: a message that quotes client input
    (a lone surrogate, say) can always be encoded."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False).encode("ascii")


def error_response(
    status: int,
    detail: str,
    errors: list[dict[str, str]] | None = None,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    """``{"detail": …, "errors": […]}`` with ``status``."""
    body = {"detail": detail, "errors": errors or [], **extra}
    return _AsciiJSONResponse(body, status_code=status, headers=dict(headers or {}))


def check_token(authorization: str | None, expected: str | None) -> None:
    """With a token configured, ``Authorization: Bearer <token>`` is required (compared
    in constant time). The token itself never appears in a message."""
    if not expected:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode("utf-8", "surrogateescape"), expected.encode()
    ):
        raise Refusal(
            401,
            "this endpoint requires 'Authorization: Bearer <token>' with the token set in "
            f"{TOKEN_ENV} where the app runs",
            headers={"WWW-Authenticate": "Bearer"},
        )


def check_media_type(content_type: str | None) -> None:
    """Only ``application/json`` (a web page cannot send it cross-origin without a
    CORS preflight, which this app never grants)."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise Refusal(
            415,
            f"the body must be JSON sent with 'Content-Type: application/json', "
            f"got {media or 'no Content-Type'!r}",
        )


async def read_body(
    content_length: str | None, chunks: AsyncIterator[bytes], max_bytes: int = MAX_BODY_BYTES
) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``max_bytes``: from
    ``Content-Length`` before reading, else while streaming (never more held)."""
    if content_length is not None:
        if not content_length.strip().isdigit():
            raise Refusal(400, f"Content-Length {content_length[:40]!r} is not a byte count")
        if int(content_length) > max_bytes:
            raise Refusal(413, f"request body of {int(content_length)} bytes exceeds {max_bytes}")
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > max_bytes:
            raise Refusal(413, f"request body exceeds {max_bytes} bytes")
    return bytes(body)


def parse_json(body: bytes) -> Any:
    """UTF-8 JSON → Python value; 400 for any other encoding, bad syntax or a nesting
    too deep to parse."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise Refusal(
            400, f"the body must be UTF-8 encoded JSON (byte {error.start} is not UTF-8)"
        ) from None
    try:
        return json.loads(text)
    except RecursionError:
        raise Refusal(400, "request body is nested too deeply to be a sampling request") from None
    except ValueError as error:
        raise Refusal(400, f"request body is not valid JSON: {error}") from None


def network_evaluations(job: SampleJob) -> int:
    """What a request costs, in evaluations of a network over one image and step:
    the denoiser once, its null-label pass for classifier-free guidance, and the
    classifier's forward and backward for classifier guidance."""
    passes = 1 + (job.guidance_scale > 0) + 2 * (job.classifier_scale > 0)
    return len(job.labels) * job.steps * passes


def check_budget(job: SampleJob, budget: int) -> None:
    cost = network_evaluations(job)
    if cost > budget:
        raise Refusal(
            422,
            f"this request costs {cost:,} network evaluations (images × steps × passes: "
            f"classifier-free guidance doubles, classifier guidance adds 2), over this "
            f"endpoint's budget of {budget:,} per request: ask for fewer images or steps",
            [
                {
                    "field": "request",
                    "message": f"costs {cost} network evaluations",
                    "allowed": f"at most {budget} per request",
                }
            ],
        )
