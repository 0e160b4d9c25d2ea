"""Validation of sampling requests against the app's limits and the model's classes."""

import json

import pytest
from pydantic import ValidationError

from serving.schemas import MAX_SEED, RequestLimits, SampleRequest, describe_errors

NAMES = ("zero", "one", "two", "three")


@pytest.fixture
def limits() -> RequestLimits:
    return RequestLimits.for_model(
        NAMES,
        num_classes=4,
        num_timesteps=100,
        max_images=8,
        max_steps=250,
        default_steps=50,
        max_guidance_scale=10,
        max_classifier_scale=20,
    )


def _parse(body: dict | str, limits: RequestLimits) -> SampleRequest:
    text = body if isinstance(body, str) else json.dumps(body)
    return SampleRequest.model_validate_json(text, context=limits)


def test_limits_are_capped_by_the_model_and_unnamed_classes_get_numbers():
    limits = RequestLimits.for_model((), 3, 100, 8, 250, 500, 10, 20)
    assert limits.class_names == ("0", "1", "2")
    assert limits.max_steps == 100 and limits.default_steps == 100


def test_names_and_ids_resolve_and_defaults_fill_in(limits):
    job = _parse({"labels": [0, "three", 2], "guidance_scale": 3, "seed": 7}, limits).to_job(limits)
    assert job.labels == (0, 3, 2)
    assert (job.guidance_scale, job.classifier_scale) == (3.0, 0.0)
    assert (job.sampler, job.steps, job.eta, job.seed) == ("ddim", 50, 0.0, 7)

    job = _parse({"label": "one", "num_samples": 3, "sampler": "ddpm", "eta": 0.5}, limits).to_job(
        limits
    )
    assert job.labels == (1, 1, 1)
    assert job.eta == 0.0  # η has no effect on DDPM, so it never splits DDPM batches
    assert 0 <= job.seed < 2**31  # a random seed, reported back to the client
    assert (job.eps_scaling, job.eps_scaling_slope) == (1.0, 0.0)  # off unless asked for
    scaled = _parse({"label": 0, "eps_scaling": 1.01, "eps_scaling_slope": -0.2}, limits)
    assert (scaled.to_job(limits).eps_scaling, scaled.to_job(limits).eps_scaling_slope) == (
        1.01,
        -0.2,
    )


def test_label_alone_means_one_image(limits):
    assert _parse({"label": 2}, limits).to_job(limits).labels == (2,)


BAD = [
    ({"label": "four"}, "label", "unknown class name 'four'"),
    ({"labels": [1, 4]}, "labels", "labels[1]: class id 4 is out of range 0 to 3"),
    ({"labels": [-1]}, "labels", "out of range"),
    ({"labels": "three"}, "labels", "valid array"),
    ({"labels": [True]}, "labels", "neither a class id"),
    ({"labels": [1.5]}, "labels", "neither a class id"),
    ({"labels": []}, "labels", "0 labels asked for, allowed 1 to 8"),
    ({"labels": [0] * 9}, "labels", "9 labels asked for, allowed 1 to 8"),
    ({"label": 0, "num_samples": 9}, "num_samples", "9 images asked for, allowed 1 to 8"),
    ({"label": 0, "num_samples": 0}, "num_samples", "allowed 1 to 8"),
    ({"label": 0, "guidance_scale": -1}, "guidance_scale", "-1 is outside 0 to 10"),
    ({"label": 0, "guidance_scale": 11}, "guidance_scale", "11 is outside 0 to 10"),
    ({"label": 0, "guidance_scale": "3"}, "guidance_scale", "valid number"),
    ({"label": 0, "classifier_scale": -0.5}, "classifier_scale", "outside 0 to 20"),
    ({"label": 0, "steps": 0}, "steps", "0 is outside 1 to 100"),
    ({"label": 0, "steps": 101}, "steps", "101 is outside 1 to 100"),
    ({"label": 0, "steps": 2.5}, "steps", "valid integer"),
    ({"label": 0, "sampler": "euler"}, "sampler", "'ddpm', 'ddim' or 'dpmpp_2m'"),
    ({"label": 0, "eta": 1.5}, "eta", "1.5 is outside 0 to 1"),
    ({"label": 0, "seed": -1}, "seed", "outside 0"),
    ({"label": 0, "seed": MAX_SEED + 1}, "seed", "outside 0"),
    ({"label": 0, "format": "gif"}, "format", "'png', 'json' or 'npy'"),
    ({"label": 0, "eps_scaling": 0.1}, "eps_scaling", "0.1 is outside 0.5 to 2"),
    ({"label": 0, "eps_scaling_slope": 2}, "eps_scaling_slope", "2 is outside -1 to 1"),
    ({"label": 0, "eps_scaling_slope": -1.5}, "eps_scaling_slope", "outside -1 to 1"),
    (
        {"label": 0, "eps_scaling": 0.5, "eps_scaling_slope": -0.5},
        "request",
        "epsilon scaling must stay positive",
    ),
    ({"label": 0, "lables": [1]}, "request", "unknown field 'lables'"),
    ({}, "request", "give either 'labels'"),
    ({"label": 0, "labels": [1]}, "request", "give either 'labels'"),
    ({"labels": [1], "num_samples": 2}, "request", "'num_samples' goes with 'label'"),
    ('{"label": 0, "guidance_scale": NaN}', "guidance_scale", "finite number"),
]


@pytest.mark.parametrize(("body", "field", "message"), BAD)
def test_bad_requests_name_the_field_and_what_it_allows(limits, body, field, message):
    with pytest.raises(ValidationError) as caught:
        _parse(body, limits)
    problems = describe_errors(caught.value, limits)
    assert problems[0]["field"] == field
    assert message in problems[0]["message"]
    assert problems[0]["allowed"]


def test_allowed_text_lists_the_limits(limits):
    assert limits.allowed("steps") == "an integer from 1 to 100"
    assert "'zero', 'one', 'two', 'three'" in limits.allowed("labels")
    assert "1 to 8" in limits.allowed("labels")


def test_validation_needs_the_limits_as_context():
    with pytest.raises(TypeError, match="context=RequestLimits"):
        SampleRequest.model_validate({"label": 0})


def test_the_documented_examples_are_valid_requests_for_the_digits():
    digits = RequestLimits.for_model(tuple("0123456789"), 10, 1000, 8, 250, 50, 10, 20)
    schema = SampleRequest.model_json_schema()
    assert schema["examples"] and schema["additionalProperties"] is False
    for example in schema["examples"]:
        assert _parse(example, digits).to_job(digits).labels
    label = schema["properties"]["label"]["anyOf"]  # an id or a name, as validated
    assert {"type": "integer", "minimum": 0} in label and {"type": "string"} in label


def test_lineage_headers_carry_the_run_and_dataset_and_skip_what_is_unknown():
    from serving.schemas import ModelVersionInfo

    full = ModelVersionInfo(
        name="ldm", version="3", alias="champion", run_id="r1", dataset_digest="d" * 64
    )
    assert full.headers() == {
        "X-Model-Name": "ldm",
        "X-Model-Version": "3",
        "X-Model-Alias": "champion",
        "X-Model-Run-Id": "r1",
        "X-Dataset-Digest": "d" * 64,
    }
    bare = ModelVersionInfo(name="ldm", version="3", alias=None)
    assert bare.headers() == {"X-Model-Name": "ldm", "X-Model-Version": "3"}
