"""What a request must pass before it costs anything: token, media type, size, JSON,
work budget. Every refusal is a 4xx with a reason, whatever the client sends."""

from __future__ import annotations

import asyncio
import json

import pytest

from serving.admission import (
    MAX_BODY_BYTES,
    Refusal,
    check_budget,
    check_media_type,
    check_token,
    error_response,
    network_evaluations,
    parse_json,
    read_body,
)
from serving.sampler import SampleJob


def _refused(call, *args) -> Refusal:
    with pytest.raises(Refusal) as caught:
        call(*args)
    return caught.value


def _job(images: int, steps: int, w: float = 0.0, s: float = 0.0) -> SampleJob:
    return SampleJob((1,) * images, w, s, "ddim", steps, 0.0, 0)


def test_no_token_configured_lets_every_request_through():
    check_token(None, None)
    check_token("Bearer anything", "")


@pytest.mark.parametrize(
    "header", [None, "", "Bearer", "Bearer wrong", "Basic c2VjcmV0", "bearer secret-tokenX"]
)
def test_a_missing_or_wrong_token_is_a_401_that_never_shows_the_token(header):
    refusal = _refused(check_token, header, "secret-token")
    assert refusal.status == 401 and refusal.headers == {"WWW-Authenticate": "Bearer"}
    body = refusal.response().body.decode()
    assert "secret-token" not in body and "LDM_API_TOKEN" in body


def test_the_right_token_passes_in_any_scheme_case():
    check_token("Bearer secret-token", "secret-token")
    check_token("bearer  secret-token ", "secret-token")


NOT_JSON = [
    None,
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/jsonx",
]


@pytest.mark.parametrize("media", NOT_JSON)
def test_only_json_bodies_are_accepted(media):
    refusal = _refused(check_media_type, media)
    assert refusal.status == 415 and "application/json" in refusal.detail


def test_json_with_a_charset_is_json():
    check_media_type("application/json")
    check_media_type("Application/JSON; charset=utf-8")


async def _chunks(parts: list[bytes], seen: list[int]):
    for part in parts:
        seen.append(len(part))
        yield part


def test_a_declared_size_over_the_limit_is_refused_before_reading():
    seen: list[int] = []
    with pytest.raises(Refusal) as caught:
        asyncio.run(read_body(str(MAX_BODY_BYTES + 1), _chunks([b"x"], seen)))
    assert caught.value.status == 413 and seen == []  # not one byte was read


def test_a_streamed_body_stops_being_read_at_the_limit():
    seen: list[int] = []
    parts = [b"x" * 100_000] * 10  # 1 MB announced nowhere (chunked)
    with pytest.raises(Refusal) as caught:
        asyncio.run(read_body(None, _chunks(parts, seen)))
    assert caught.value.status == 413
    assert sum(seen) <= MAX_BODY_BYTES + 100_000  # stopped within one chunk of the limit


def test_a_small_body_is_read_whole_and_a_bad_length_is_a_400():
    assert asyncio.run(read_body("5", _chunks([b"{}", b"{}x"], []))) == b"{}{}x"
    assert asyncio.run(read_body(None, _chunks([b"{}"], []))) == b"{}"
    assert _refused(asyncio.run, read_body("-3", _chunks([], []))).status == 400


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "nested too deeply"),
        ('{"label": 3}'.encode("utf-16"), "UTF-8"),
        (b'{"label": "\xff"}', "UTF-8"),
        (b'{"label": 3,', "not valid JSON"),
        (b"", "not valid JSON"),
        (b'{"seed": ' + b"9" * 5000 + b"}", "not valid JSON"),
    ],
    ids=["array bomb", "object bomb", "utf-16", "invalid utf-8", "truncated", "empty", "huge int"],
)
def test_no_body_can_break_the_parser(body, message):
    refusal = _refused(parse_json, body)
    assert refusal.status == 400 and message in refusal.detail


def test_a_message_quoting_a_lone_surrogate_is_still_encodable():
    value = parse_json(b'{"label": "\\ud800"}')["label"]
    response = error_response(422, f"unknown class name {value}")
    assert json.loads(response.body)["detail"] == f"unknown class name {value}"
    assert response.body.isascii()


def test_cost_counts_images_steps_and_the_passes_of_each_guidance():
    assert network_evaluations(_job(8, 50)) == 400
    assert network_evaluations(_job(8, 50, w=3)) == 800  # the null pass
    assert network_evaluations(_job(8, 50, s=1)) == 1200  # classifier forward + backward
    assert network_evaluations(_job(64, 100, w=3, s=1)) == 25_600


def test_the_budget_refuses_with_the_cost_and_the_budget():
    check_budget(_job(64, 100, w=2), 16_384)  # 12,800: fits
    refusal = _refused(check_budget, _job(64, 100, w=2, s=1), 16_384)
    assert refusal.status == 422
    assert "25,600 network evaluations" in refusal.detail and "16,384" in refusal.detail
