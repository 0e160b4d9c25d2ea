"""A small HTTP client of the sampling API (used by ``ldm sample``); standard library only."""

from __future__ import annotations

import contextlib
import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any


class SampleError(RuntimeError):
    """The server refused the request or could not be reached; the message says why."""


@dataclass(frozen=True)
class SampleReply:
    body: bytes  # PNG grid, .npy bytes or JSON, as asked
    headers: dict[str, str]

    @property
    def summary(self) -> str:
        h = self.headers
        if "x-model-version" not in h:
            data = json.loads(self.body)
            return (
                f"{len(data['images'])} images from {data['model']['name']} version "
                f"{data['model']['version']}, seed {data['seed']}, {data['elapsed_s']:.2f} s"
            )
        count = len(h.get("x-labels", "").split(","))
        return (
            f"{count} images from {h['x-model-name']} version {h['x-model-version']}, "
            f"seed {h['x-seed']}, {float(h['x-elapsed-s']):.2f} s"
        )


def parse_label(text: str) -> int | str:
    """``"3"`` → 3 (a class id); anything else stays a class name."""
    return int(text) if text.strip().lstrip("-").isdigit() else text


def request_samples(
    url: str, payload: dict[str, Any], timeout: float = 300.0, token: str | None = None
) -> SampleReply:
    """POST ``payload`` to ``URL/v1/samples``; :class:`SampleError` on a 4xx/5xx or no answer.

    ``token``: the endpoint's bearer token (default: ``LDM_API_TOKEN`` if set)."""
    endpoint = url.rstrip("/") + "/v1/samples"
    headers = {"Content-Type": "application/json"}
    token = token or os.environ.get("LDM_API_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(
        endpoint, data=json.dumps(payload).encode(), headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            headers = {k.lower(): v for k, v in response.headers.items()}
            return SampleReply(response.read(), headers)
    except urllib.error.HTTPError as error:
        text = error.read().decode(errors="replace")
        with contextlib.suppress(ValueError, KeyError, TypeError):
            text = json.loads(text)["detail"]  # the server's explanation, if it gave one
        raise SampleError(f"{endpoint} answered {error.code}: {text}") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise SampleError(
            f"cannot reach {endpoint}: {reason}. Is 'ldm serve' running there?"
        ) from None
