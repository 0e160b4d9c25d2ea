"""The sampling app over real HTTP: ``serve.run`` on the two-node test cluster, a tiny
model registered in the real MLflow server, requests good and bad, step-level batching
of mixed requests under concurrency, seeds, the page, and the switch when @champion
moves."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import torch
from mlflow import MlflowClient
from ray import serve

from flows.cli import main as ldm
from serving.app import build_app
from serving.config import AppConfig
from serving.encoding import decode_png
from tests.integration.browser import Chromium
from tests.integration.services import free_port
from training.latent_diffusion import LatentDiffusion
from training.mlflow.registry import log_model_version
from training.mlflow.tracking import DATASET_DIGEST_TAG, DATASET_URL_TAG
from training.optimisation import cpu_has_native_bf16
from training.presets import get_preset

pytestmark = [pytest.mark.integration]

MODEL_NAME = "ldm-serve-it"
APP_ARGS = {
    "num_cpus": 0.5,
    "torch_threads": 1,
    "max_rows_per_forward": 32,
    "max_images_per_request": 8,
    "max_steps": 20,
    "max_evaluations_per_request": 400,
    "reload_interval_s": 1.0,
}
JSON = {"Content-Type": "application/json"}
DATASET_URL = "s3://ldm-data/digits/manifest.json"  # lineage recorded on the training run
DATASET_DIGEST = "ab" * 32


def _tiny_model(seed: int) -> LatentDiffusion:
    torch.manual_seed(seed)
    config = get_preset("tiny").for_data(32, 1, 10, class_names=tuple("0123456789"))
    model = LatentDiffusion.build(config)
    with torch.no_grad():  # a fresh UNet predicts ε = 0; make the weights matter
        model.denoiser.conv_out.weight.normal_(0, 0.05)
    return model.eval()


def _register(tracking_uri: str, seed: int) -> str:
    """A new version of MODEL_NAME made @champion; its version number."""
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("serving-it")
    if experiment is None:
        experiment_id = client.create_experiment("serving-it")
    else:
        experiment_id = experiment.experiment_id
    tags = {DATASET_URL_TAG: DATASET_URL, DATASET_DIGEST_TAG: DATASET_DIGEST}
    run_id = client.create_run(experiment_id, tags=tags).info.run_id
    version = log_model_version(_tiny_model(seed), tracking_uri, run_id, MODEL_NAME, "champion")
    client.set_terminated(run_id)
    return version.version


@pytest.fixture(scope="module")
def app_url(ray_cluster, mlflow_server) -> Iterator[str]:
    assert _register(mlflow_server, seed=0) == "1"
    port = free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    args = {"model_uri": f"models:/{MODEL_NAME}@champion", "tracking_uri": mlflow_server}
    serve.run(build_app(args | APP_ARGS), name="ldm-it", route_prefix="/")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


def _post(
    url: str, body: dict | bytes, timeout: float = 120, headers: dict | None = None
) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        f"{url}/v1/samples", content=content, timeout=timeout, headers=JSON | (headers or {})
    )


def _images(response: httpx.Response) -> np.ndarray:
    """uint8 [N, H, W, C] from a format=json answer."""
    assert response.status_code == 200, response.text
    pngs = response.json()["images"]
    return np.stack([decode_png(base64.b64decode(p)) for p in pngs])


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to ±2 levels on at most 1% of the pixels (see serving.sampler)."""
    diff = np.abs(a.astype(int) - b.astype(int))
    return a.shape == b.shape and diff.max() <= 2 and (diff > 0).mean() <= 0.01


def test_health_model_docs_and_page(app_url, mlflow_server):
    assert httpx.get(f"{app_url}/healthz").json() == {
        "status": "ok",
        "model": MODEL_NAME,
        "version": "1",
    }
    info = httpx.get(f"{app_url}/v1/model").json()
    assert (info["name"], info["version"], info["alias"]) == (MODEL_NAME, "1", "champion")
    assert info["class_names"] == list("0123456789")
    assert (info["image_size"], info["image_channels"], info["num_timesteps"]) == (32, 1, 100)
    assert info["config"]["denoiser"]["model_channels"] == 16
    assert info["limits"]["max_steps"] == 20 and info["limits"]["max_images_per_request"] == 8
    assert (info["dataset_url"], info["dataset_digest"]) == (DATASET_URL, DATASET_DIGEST)
    assert info["run_id"] == MlflowClient(mlflow_server).get_model_version(MODEL_NAME, "1").run_id
    # autocast "auto", resolved by the replica for its own CPU
    assert info["batching"]["autocast"] == ("bf16" if cpu_has_native_bf16() else "off")
    docs = httpx.get(f"{app_url}/docs")
    assert docs.status_code == 200 and "/openapi.json" in docs.text
    schema = httpx.get(f"{app_url}/openapi.json").json()["paths"]["/v1/samples"]["post"]
    body = schema["requestBody"]["content"]["application/json"]["schema"]
    fields = {"label", "labels", "guidance_scale", "sampler", "eps_scaling"}
    assert fields <= set(body["properties"])
    assert body["examples"] and "SampleResponse" in json.dumps(schema["responses"]["200"])
    page = httpx.get(f"{app_url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for element in ('id="class"', 'id="guidance"', 'id="sampler"', "v1/samples", "v1/model"):
        assert element in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no external assets


def test_formats_carry_the_same_images_and_the_model_version(app_url):
    request = {"labels": [3, "7", 1], "guidance_scale": 2, "steps": 6, "seed": 11}
    as_json = _post(app_url, request | {"format": "json"})
    body = as_json.json()
    run_id = body["model"]["run_id"]
    assert body["model"] == {
        "name": MODEL_NAME,
        "version": "1",
        "alias": "champion",
        "run_id": run_id,
        "dataset_url": DATASET_URL,
        "dataset_digest": DATASET_DIGEST,
    }
    assert as_json.headers["x-model-run-id"] == run_id
    assert as_json.headers["x-dataset-digest"] == DATASET_DIGEST
    assert (body["labels"], body["class_names"], body["seed"]) == ([3, 7, 1], ["3", "7", "1"], 11)
    assert body["image_shape"] == [32, 32, 1] and body["elapsed_s"] > 0
    images = _images(as_json)
    assert images.std() > 5  # not a constant image

    as_npy = _post(app_url, request | {"format": "npy"})
    assert as_npy.headers["content-type"] == "application/x-npy"
    assert as_npy.headers["x-model-version"] == "1" and as_npy.headers["x-seed"] == "11"
    assert as_npy.headers["x-dataset-digest"] == DATASET_DIGEST
    assert _close(np.load(io.BytesIO(as_npy.content)), images)

    grid = decode_png(_post(app_url, request).content)  # png is the default
    assert grid.shape == (2 * 34 + 2, 2 * 34 + 2, 1)  # 3 images in a 2×2 grid, padded
    assert _close(grid[2:34, 36:68][None], images[1:2])


BAD_REQUESTS = [
    ("unknown class name", {"label": "cat"}, 422, "unknown class name 'cat'"),
    ("class id out of range", {"labels": [3, 10]}, 422, "class id 10 is out of range 0 to 9"),
    ("negative guidance", {"label": 3, "guidance_scale": -1}, 422, "-1 is outside 0 to 50"),
    ("negative classifier scale", {"label": 3, "classifier_scale": -2}, 422, "outside 0 to 100"),
    ("zero steps", {"label": 3, "steps": 0}, 422, "0 is outside 1 to 20"),
    ("too many steps", {"label": 3, "steps": 21}, 422, "21 is outside 1 to 20"),
    ("too many images", {"label": 3, "num_samples": 9}, 422, "9 images asked for, allowed 1 to 8"),
    ("too many labels", {"labels": [1] * 9}, 422, "9 labels asked for, allowed 1 to 8"),
    ("unknown sampler", {"label": 3, "sampler": "euler"}, 422, "'ddpm', 'ddim' or 'dpmpp_2m'"),
    ("eta above 1", {"label": 3, "eta": 1.5}, 422, "1.5 is outside 0 to 1"),
    ("labels as a string", {"labels": "3"}, 422, "valid array"),
    ("steps as a string", {"label": 3, "steps": "5"}, 422, "valid integer"),
    ("unknown field", {"label": 3, "guidance": 2}, 422, "unknown field 'guidance'"),
    ("no label", {"steps": 5}, 422, "give either 'labels'"),
    ("unknown format", {"label": 3, "format": "gif"}, 422, "'png', 'json' or 'npy'"),
    ("malformed JSON", b'{"label": 3,', 400, "not valid JSON"),
    ("empty body", b"", 400, "not valid JSON"),
    ("JSON array", b"[3]", 422, "object"),
    ("nesting bomb", b"[" * 200_000 + b"]" * 200_000, 413, "exceeds"),
    ("deep nesting", b'{"labels": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", 400, "too deeply"),
    ("UTF-16 JSON", '{"label": 3}'.encode("utf-16"), 400, "UTF-8"),
    ("NaN", b'{"label": 3, "guidance_scale": NaN}', 422, "finite number"),
    ("huge integer", b'{"label": 3, "seed": ' + b"9" * 5000 + b"}", 400, "not valid JSON"),
    (
        "over the work budget",
        {"label": 3, "num_samples": 8, "steps": 20, "guidance_scale": 1, "classifier_scale": 1},
        422,
        "costs 640 network evaluations",
    ),
]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_requests_get_a_4xx_that_says_what_is_allowed(app_url, body, status, message):
    response = _post(app_url, body)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert message in detail
    if status == 422 and "budget" not in detail:
        assert "allowed:" in detail


def test_only_json_is_accepted_and_sizes_are_checked_before_the_body_is_read(app_url):
    form = httpx.post(
        f"{app_url}/v1/samples",
        content=b'{"label": 3}',
        headers={"Content-Type": "text/plain"},
        timeout=30,
    )
    assert form.status_code == 415 and "application/json" in form.json()["detail"]
    bare = httpx.post(f"{app_url}/v1/samples", content=b'{"label": 3}', timeout=30)
    assert bare.status_code == 415

    def chunked():  # no Content-Length: the replica stops reading past the limit
        for _ in range(64):  # 4 MiB
            yield b" " * 65_536

    with httpx.Client(timeout=30) as client:
        streamed = client.post(f"{app_url}/v1/samples", content=chunked(), headers=JSON)
    assert streamed.status_code == 413 and "exceeds" in streamed.json()["detail"]
    declared = _post(app_url, b" " * 1_000_000)  # with its Content-Length
    assert declared.status_code == 413 and "1000000 bytes exceeds" in declared.json()["detail"]


def test_bad_requests_do_not_disturb_good_ones(app_url):
    good = {"label": 5, "num_samples": 2, "steps": 10, "seed": 3, "format": "json"}
    alone = _images(_post(app_url, good))
    with ThreadPoolExecutor(len(BAD_REQUESTS) + 1) as pool:
        pending = pool.submit(_post, app_url, good)
        bad = list(pool.map(lambda case: _post(app_url, case[1]), BAD_REQUESTS))
        assert all(400 <= r.status_code < 500 for r in bad), [r.text for r in bad]
        assert _close(_images(pending.result()), alone)
    assert httpx.get(f"{app_url}/v1/model").json()["stats"]["failed"] == 0
    assert httpx.get(f"{app_url}/wrong").status_code == 404
    assert httpx.get(f"{app_url}/v1/samples").status_code == 405


def test_the_page_samples_in_a_real_browser(app_url, tmp_path):
    artifacts = Path(os.environ.get("LDM_TEST_ARTIFACTS", "test-artifacts"))
    with Chromium(tmp_path / "profile") as browser:
        browser.open(f"{app_url}/")
        browser.wait_for("document.getElementById('class').options.length === 10")
        assert browser.evaluate("document.getElementById('steps').max") == "20"
        settings = {"class": "7", "count": "4", "steps": "5", "seed": "3", "classifier": "1"}
        fill = "; ".join(  # as typed: the page's sliders and cost line follow
            f"$({k!r}).value = {v!r}; $({k!r}).dispatchEvent(new Event('input'))"
            for k, v in settings.items()
        )
        # the button is disabled as the click starts the request, enabled when it ends
        assert browser.evaluate(f"{fill}; $('go').click(); $('go').disabled") is True
        browser.wait_for("document.body.dataset.done === '1'")
        status = browser.evaluate("$('status').textContent")
        assert status.startswith("4 images, seed 3"), status
        assert browser.evaluate("$('go').disabled") is False
        all_of = "[...document.querySelectorAll('{}')]"
        captions = browser.evaluate(all_of.format("figcaption") + ".map(c => c.textContent)")
        assert captions == ["7"] * 4
        widths = all_of.format("#images img") + ".map(i => i.complete && i.naturalWidth)"
        assert browser.wait_for(f"{widths}.every(w => w === 32)")
        lineage = browser.evaluate("$('lineage').textContent")
        assert "v1, MLflow run " in lineage and DATASET_DIGEST[:16] in lineage
        browser.screenshot(artifacts / "page.png")

        # the download is the grid the endpoint's png format gives for the same request
        downloads = tmp_path / "downloads"
        browser.download_to(downloads)
        browser.evaluate("$('download').click()")
        deadline = time.monotonic() + 30
        while not list(downloads.glob("*.png")) and time.monotonic() < deadline:
            time.sleep(0.1)
        (saved,) = downloads.glob("*.png")
        assert saved.name == f"{MODEL_NAME}-v1-seed3.png"
        request = {"label": 7, "num_samples": 4, "steps": 5, "seed": 3, "guidance_scale": 3}
        served = decode_png(_post(app_url, request | {"classifier_scale": 1.0}).content)
        assert _close(decode_png(saved.read_bytes())[..., :1], served)

        # a refusal, an answer that is not JSON and a failed fetch all end on a message
        browser.evaluate("$('count').value = '9'; $('go').click()")
        browser.wait_for("document.body.dataset.done === '1' && !$('go').disabled")
        assert browser.evaluate("$('status').textContent").startswith("422: num_samples")
        proxy_page = "new Response('<html>Bad Gateway</html>', {status: 502})"
        browser.evaluate(f"window.fetch = async () => {proxy_page}; $('go').click()")
        browser.wait_for("document.body.dataset.done === '1' && !$('go').disabled")
        assert browser.evaluate("$('status').textContent") == "502: <html>Bad Gateway</html>"
        browser.evaluate("window.fetch = async () => { throw new TypeError('offline'); }")
        browser.evaluate("$('go').click()")
        browser.wait_for("document.body.dataset.done === '1' && !$('go').disabled")
        assert browser.evaluate("$('status').className") == "error"
        assert "offline" in browser.evaluate("$('status').textContent")


def _concurrent_requests() -> list[dict]:
    compatible = [
        {"labels": [i, (i + 1) % 10], "guidance_scale": float(i % 3), "seed": 100 + i}
        for i in range(6)
    ]
    compatible[1]["classifier_scale"] = 1.0  # per-image scales share the chain
    others = [
        {"label": 4, "seed": 200, "sampler": "ddpm"},  # a different sampler
        {"label": 4, "seed": 201, "steps": 8},  # a different step count
    ]
    defaults = {"sampler": "ddim", "steps": 6, "format": "json"}
    return [defaults | r for r in compatible + others]


def _all_at_once(
    url: str, requests: list[dict], headers: dict | None = None
) -> list[httpx.Response]:
    start = threading.Barrier(len(requests))

    def fire(request: dict) -> httpx.Response:
        start.wait()
        return _post(url, request, headers=headers)

    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(fire, requests))


def test_concurrent_mixed_requests_share_forwards_and_match_their_solo_images(app_url):
    requests = _concurrent_requests()
    alone = [_images(_post(app_url, r)) for r in requests]
    for _ in range(3):  # sharing depends on arrival times; three rounds leave no doubt
        responses = _all_at_once(app_url, requests)
        batches = [r.json()["batch"] for r in responses]
        for request, batch, response, solo in zip(requests, batches, responses, alone, strict=True):
            assert (batch["sampler"], batch["steps"]) == (request["sampler"], request["steps"])
            assert batch["forwards"] == request["steps"]
            assert _close(_images(response), solo)  # same seed, same images, batched or not
        # Another sampler and another step count share forwards with the rest.
        if all(b["max_requests_per_forward"] > 1 for b in batches):
            break
    assert all(b["max_requests_per_forward"] > 1 for b in batches), batches
    stats = httpx.get(f"{app_url}/v1/model").json()["stats"]
    assert stats["max_rows_per_forward"] > 2 and stats["waiting_rows"] == 0


def test_ldm_sample_writes_the_grid(app_url, tmp_path, capsys):
    out = tmp_path / "grid.png"
    options = ["--num-samples", "4", "--guidance-scale", "3", "--steps", "5", "--seed", "1"]
    code = ldm(["sample", "--url", app_url, "--label", "3", *options, "-o", str(out)])
    assert code == 0
    assert decode_png(out.read_bytes()).shape == (70, 70, 1)
    assert f"4 images from {MODEL_NAME} version 1, seed 1" in capsys.readouterr().out


def test_ldm_serve_behind_haproxy_deploys_until_ctrl_c_and_no_secret_reaches_ray(
    app_url, mlflow_server, tmp_path
):  # app_url: version 1 registered
    """``ldm serve --ingress haproxy`` in its own process and its own local Ray
    (``--address local``), with a token: HAProxy holds the port and forwards to the
    replica, which inherits the token and the S3 key; neither appears in Ray's logs;
    Ctrl-C leaves no HAProxy and none of its files behind."""
    import os
    import tempfile
    from pathlib import Path

    port = free_port()
    command = _serve_behind_haproxy(port, mlflow_server)
    log = tmp_path / "serve.log"
    ray_tmp = Path(tempfile.mkdtemp(prefix="ldmr", dir="/tmp"))  # short: Ray's sockets
    env = os.environ | {"LDM_API_TOKEN": TOKEN, "RAY_TMPDIR": str(ray_tmp)}
    # Serve keeps a stopping replica 30 s for HAProxy to drop it; nothing is in flight here
    env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "2"
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while "Serving models:/" not in log.read_text():
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/v1/model", timeout=30).status_code == 401
        assert httpx.get(f"{url}/v1/model", headers=AUTH).json()["version"] == "1"
        reply = _post(url, {"label": 1, "steps": 3}, headers=AUTH)
        assert reply.headers["x-model-version"] == "1"
        bad = _post(url, {"label": 1, "steps": 21}, headers=AUTH)  # the app's 4xx, unchanged
        assert bad.status_code == 422 and "21 is outside 1 to 20" in bad.text
        folder = _haproxy_folder(port)
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(120)
    assert code == 0, log.read_text()[-3000:]
    assert not _haproxies_of(folder) and not folder.exists()
    assert "stopped application 'ldm'" in log.read_text()
    assert "do not require it" not in log.read_text()  # the replicas saw the token
    secrets_ = [os.environ["AWS_SECRET_ACCESS_KEY"], TOKEN]
    leaks = [
        str(path)
        for path in ray_tmp.rglob("*")
        if path.is_file() and any(s.encode() in path.read_bytes() for s in secrets_)
    ]
    searched = any(ray_tmp.rglob("runtime_env_agent.log"))  # the logs were there to search
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert leaks == [] and searched


def _serve_behind_haproxy(port: int, tracking_uri: str) -> list[str]:
    """``ldm serve --ingress haproxy`` of version 1 with its own local Ray."""
    options = ["--ingress", "haproxy", "--address", "local", "--port", str(port)]
    options += ["--model-uri", f"models:/{MODEL_NAME}/1", "--tracking-uri", tracking_uri]
    options += ["--num-cpus", "0.5", "--max-steps", "20"]
    return [sys.executable, "-m", "flows.cli", "serve", *options]


def _haproxy_folder(port: int) -> Path:
    """The private folder of the HAProxy that holds ``port`` (and only HAProxy holds it)."""
    holders = {
        c.pid
        for c in psutil.net_connections("tcp")
        if c.laddr.port == port and c.status == psutil.CONN_LISTEN
    }
    assert {Path(psutil.Process(pid).exe()).name for pid in holders} == {"haproxy"}
    config = Path(psutil.Process(holders.pop()).cmdline()[3])  # haproxy -db -f CONFIG
    folder = config.parents[1]
    assert folder.name.startswith("ldm-haproxy-") and config.is_file()
    return folder


def test_ctrl_c_while_ldm_serve_deploys_behind_haproxy_exits_130_and_leaves_nothing(
    app_url, mlflow_server, tmp_path
):  # app_url: version 1 registered
    """Ctrl-C once the replica has started but before the app is up: Serve's HAProxy
    manager is still rewriting its files for the deleted app, so its folder goes only
    after the local Ray is gone; no error from it, exit 130, no HAProxy left."""
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        command = _serve_behind_haproxy(port, mlflow_server)
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "Started HTTP server on port" not in log.read_text():  # the replica's
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        folder = _haproxy_folder(port)
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(120)
    text = log.read_text()
    assert code == 130 and "ldm serve: interrupted" in text, text[-3000:]
    assert "Serving models:/" not in text  # it was interrupted while deploying
    assert "Traceback" not in text and "ERROR" not in text, text[-3000:]
    assert not _haproxies_of(folder) and not folder.exists()


def _haproxies_of(folder: Path) -> list[int]:
    """The HAProxy processes running on a config in ``folder``."""
    found = []
    for process in psutil.process_iter(["exe", "cmdline"]):
        args = process.info["cmdline"] or []
        if Path(process.info["exe"] or "").name == "haproxy" and str(folder) in " ".join(args):
            found.append(process.pid)
    return found


def test_ldm_serve_with_haproxy_refuses_a_cluster_it_would_only_join(ray_cluster):
    """HAProxy is a node's setting at start: joining a running cluster cannot turn it
    on, so ``--ingress haproxy`` says where to set it instead of serving without it."""
    command = [sys.executable, "-m", "flows.cli", "serve", "--ingress", "haproxy"]
    result = subprocess.run(
        [*command, "--address", ray_cluster.address], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    assert f"the cluster at {ray_cluster.address}" in result.stderr
    assert "RAY_SERVE_ENABLE_HA_PROXY=1" in result.stderr and "Traceback" not in result.stderr


def test_ldm_serve_says_why_its_replica_did_not_start(app_url, mlflow_server):
    """A model the registry does not hold: Serve's own error only says the deployment
    failed; the deploy reports the replica's reason, read from Serve's status."""
    from serving.deploy import DeployError, deployment_failure, run_app

    args = {"model_uri": "models:/nosuch@champion", "tracking_uri": mlflow_server}
    config = AppConfig.model_validate(args | APP_ARGS)
    with pytest.raises(DeployError) as raised:
        run_app(config, "broken", route_prefix="/broken", timeout_s=120, delete_on_failure=True)
    assert str(raised.value).startswith("the app did not start: RuntimeError: cannot resolve")
    assert "model 'nosuch' has no alias @champion" in str(raised.value)
    assert _deleted_or_deleting("broken")  # Serve stops retrying
    assert deployment_failure("ldm-it") is None  # a healthy app has no failure


def test_a_replica_no_node_can_hold_is_reported_not_waited_for(app_url, mlflow_server, monkeypatch):
    """A GPU replica on a cluster without a GPU (``ldm serve --num-gpus 1`` on a laptop):
    on a cluster that may gain nodes the deploy waits its timeout and then says why; on
    one that cannot (the session's cluster, started without an autoscaling config, as
    `ldm up` starts one) it says so at once, as a setting to change (a ValueError, which
    the flows do not retry). Either way the app is deleted."""
    import training.ray.placement as placement
    from serving.deploy import DeployError, UnplaceableReplica, run_app

    args = {"model_uri": f"models:/{MODEL_NAME}@champion", "tracking_uri": mlflow_server}
    config = AppConfig.model_validate(args | APP_ARGS | {"num_gpus": 1})
    needs = r"a replica needs 0\.5 CPU, 1 GPU; no node of the Ray cluster has that"
    started = time.monotonic()
    with monkeypatch.context() as patched:
        patched.setattr(placement, "cluster_can_grow", lambda: True)  # as with an autoscaler
        with pytest.raises(
            DeployError, match=rf"not RUNNING 3 s after the deploy \(status \w+: {needs}"
        ):
            run_app(config, "gpu", route_prefix="/gpu", timeout_s=3, delete_on_failure=True)
    assert time.monotonic() - started < 30
    assert _deleted_or_deleting("gpu")

    started = time.monotonic()
    with pytest.raises(
        UnplaceableReplica, match=rf"{needs} \(its nodes: [^)]*\); this cluster adds no nodes"
    ):
        run_app(config, "gpu", route_prefix="/gpu", timeout_s=60, delete_on_failure=True)
    assert time.monotonic() - started < 10
    assert _deleted_or_deleting("gpu")


def _deleted_or_deleting(app_name: str, within_s: float = 10.0) -> bool:
    """Whether Serve drops ``app_name`` (or starts to) within ``within_s``."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        app = serve.status().applications.get(app_name)
        if app is None or app.status == "DELETING":
            return True
        time.sleep(0.2)
    return False


def _hammer(url: str, stop: threading.Event, seen: list[tuple[int, str]]) -> None:
    """Small requests until ``stop``, recording (status, model version) of each answer."""
    with httpx.Client(timeout=60) as client:
        while not stop.is_set():
            response = client.post(f"{url}/v1/samples", json={"label": 1, "steps": 3})
            seen.append((response.status_code, response.headers.get("x-model-version", "")))


def test_moving_the_alias_switches_replicas_without_failing_requests(app_url, mlflow_server):
    request = {"label": 2, "num_samples": 2, "steps": 10, "seed": 5, "format": "json"}
    before = _images(_post(app_url, request))
    stop, seen = threading.Event(), []
    workers = [threading.Thread(target=_hammer, args=(app_url, stop, seen)) for _ in range(2)]
    for worker in workers:
        worker.start()
    try:
        assert _register(mlflow_server, seed=1) == "2"
        deadline = time.monotonic() + 60
        while httpx.get(f"{app_url}/v1/model").json()["version"] != "2":
            assert time.monotonic() < deadline, "the replica did not switch to version 2 in 60 s"
            time.sleep(0.5)
        time.sleep(1.0)  # requests keep flowing after the switch
    finally:
        stop.set()
        for worker in workers:
            worker.join(60)
    assert seen and all(status == 200 for status, _ in seen), seen
    versions = [v for _, v in seen]
    assert versions[0] == "1" and versions[-1] == "2" and set(versions) == {"1", "2"}
    after = _post(app_url, request)
    assert after.json()["model"]["version"] == "2"
    assert not _close(_images(after), before)  # new weights, same seed: new images
    info = httpx.get(f"{app_url}/v1/model").json()
    run_id = MlflowClient(mlflow_server).get_model_version(MODEL_NAME, "2").run_id
    assert info["run_id"] == run_id and info["reload"]["last_failure"] is None
    assert mlflow_server not in json.dumps(info)  # no tracking URI is shown


# ------------------------------------------------------------------ an exposed endpoint
TOKEN = "it-token-5f2c9a"  # a test's own token, not a credential
GUARDED_ARGS = APP_ARGS | {
    "max_rows_per_forward": 8,
    "max_ongoing_requests": 2,  # one sampling, one waiting in the replica
    "max_queued_requests": 1,  # and one waiting for the replica; more: 503
    "retry_after_s": 3,
    "request_timeout_s": 1.5,
    "max_images_per_request": 64,
    "max_steps": 100,
    "max_evaluations_per_request": 25_600,
}
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def guarded_url(app_url, mlflow_server) -> str:
    """A second app on the same Serve instance with LDM_API_TOKEN set where it runs,
    a small queue and a short request timeout."""
    from serving.app import SamplerDeployment
    from serving.config import AppConfig

    config = AppConfig.model_validate(
        {"model_uri": f"models:/{MODEL_NAME}/1", "tracking_uri": mlflow_server} | GUARDED_ARGS
    )
    options = config.deployment_options()
    options["ray_actor_options"] |= {"runtime_env": {"env_vars": {"LDM_API_TOKEN": TOKEN}}}
    options["health_check_period_s"] = 2  # a replica whose engine died is replaced sooner
    app = SamplerDeployment.options(name="Guarded", **options).bind(config)
    serve.run(app, name="ldm-guarded", route_prefix="/guarded")
    return f"{app_url}/guarded"


def _stats(url: str) -> dict:
    return httpx.get(f"{url}/v1/model", headers=AUTH, timeout=30).json()["stats"]


def test_a_token_guards_every_v1_route_and_is_never_shown(guarded_url):
    small = {"label": 2, "steps": 3, "format": "json"}
    assert _post(guarded_url, small).status_code == 401
    wrong = _post(guarded_url, small, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    assert TOKEN not in wrong.text and "LDM_API_TOKEN" in wrong.json()["detail"]
    assert httpx.get(f"{guarded_url}/v1/model", timeout=30).status_code == 401
    assert _post(guarded_url, small, headers=AUTH).status_code == 200
    info = httpx.get(f"{guarded_url}/v1/model", headers=AUTH, timeout=30)
    assert info.json()["limits"]["token_required"] is True and TOKEN not in info.text
    assert httpx.get(f"{guarded_url}/healthz", timeout=30).status_code == 200  # open
    page = httpx.get(f"{guarded_url}/", timeout=30)
    assert page.status_code == 200 and 'id="token"' in page.text and TOKEN not in page.text


def test_a_burst_beyond_the_queue_gets_503_with_retry_after_and_no_500(guarded_url):
    request = {"label": 1, "num_samples": 8, "steps": 50, "seed": 1}
    started = time.monotonic()
    responses = _all_at_once(guarded_url, [request] * 8, headers=AUTH)
    assert time.monotonic() - started < 60
    codes = sorted(r.status_code for r in responses)
    # Admitted requests are sampled; on a busy machine one that waited past
    # request_timeout_s (1.5 s) ends as a 504, also an answer that says what happened.
    assert set(codes) <= {200, 503, 504}, codes
    assert codes.count(200) >= 1 and codes.count(503) >= 1, codes
    assert all(r.headers["retry-after"] == "3" for r in responses if r.status_code == 503)


def test_a_slow_request_times_out_and_a_departed_client_is_not_sampled(guarded_url):
    """Both are dropped at the next step: the long chain stops when it times out, and the
    request whose client left never gets a row."""
    before = _stats(guarded_url)
    long = {
        "label": 4,
        "num_samples": 64,
        "steps": 100,
        "guidance_scale": 2,
        "classifier_scale": 1,
        "seed": 2,
    }
    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(_post, guarded_url, long, 60, AUTH)
        time.sleep(0.5)  # the long request fills the forward; this one waits behind it
        with pytest.raises(httpx.TimeoutException):
            _post(guarded_url, {"label": 5, "steps": 3}, timeout=0.5, headers=AUTH)
        answer = slow.result()
    assert answer.status_code == 504 and "1.5 s" in answer.json()["detail"]
    deadline = time.monotonic() + 30
    while (stats := _stats(guarded_url))["active_rows"] or stats["waiting_rows"]:
        assert time.monotonic() < deadline, stats  # the long chain does not run on
        time.sleep(0.2)
    assert stats["requests"] == before["requests"]  # neither was answered with images
    assert stats["cancelled"] - before["cancelled"] == 2
    assert stats["timed_out"] - before["timed_out"] == 1


def test_engine_metrics_reach_prometheus(app_url, ray_cluster):
    """The scheduler's figures on the nodes' Prometheus endpoints, tagged with the
    deployment (Ray exports them every few seconds)."""
    assert _post(app_url, {"label": 1, "steps": 3}).status_code == 200
    names = ("ldm_images_total", "ldm_images_per_forward_bucket", "ldm_step_seconds_bucket")
    deadline = time.monotonic() + 90
    while True:
        text = "\n".join(httpx.get(url, timeout=10).text for url in ray_cluster.metrics_urls)
        ours = [line for line in text.splitlines() if 'deployment="LDMSampler"' in line]
        found = {name for name in names if any(line.startswith(f"ray_{name}") for line in ours)}
        if found == set(names):
            break
        assert time.monotonic() < deadline, f"missing {set(names) - found}"
        time.sleep(2)
    totals = [float(line.rsplit(" ", 1)[1]) for line in ours if "ldm_images_total" in line]
    assert sum(totals) > 0
    assert any(line.startswith("ray_ldm_waiting_images") for line in ours)


def _engines_of(replica: str) -> list[tuple[int, int]]:
    """(engine pid, replica pid) of every sampling engine whose parent process is a
    replica of ``replica`` (Ray titles an actor's process ``ray::ServeReplica:APP:NAME``)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            if "-m serving.engine" not in cmdline:
                continue
            status = (entry / "status").read_text()
            parent = int(status.split("PPid:")[1].split()[0])
            title = Path(f"/proc/{parent}/cmdline").read_bytes().decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read
        if f"ServeReplica:{replica}" in title:
            found.append((int(entry.name), parent))
    return found


def test_a_replica_whose_engine_dies_answers_503_and_is_replaced(guarded_url):
    """The sampling loop runs in a child process of the replica. Killed, the replica
    answers 503 with Retry-After (not a 500, not a hang), reports itself unhealthy, and
    Serve replaces it; requests succeed again."""
    assert httpx.get(f"{guarded_url}/v1/model", headers=AUTH).json()["batching"]["engine"] == (
        "process"
    )
    (engine, replica) = _engines_of("ldm-guarded:Guarded")[0]
    os.kill(engine, signal.SIGKILL)
    small = {"label": 3, "steps": 3, "format": "json"}
    first = _post(guarded_url, small, timeout=30, headers=AUTH)
    assert first.status_code == 503, first.text
    assert first.headers["retry-after"] == "3" and "being replaced" in first.json()["detail"]
    started, codes = time.monotonic(), []
    while (code := _post(guarded_url, small, timeout=30, headers=AUTH).status_code) != 200:
        codes.append(code)
        assert time.monotonic() - started < 120, f"not replaced in 120 s: {codes}"
        time.sleep(0.5)
    assert set(codes) <= {503}, codes
    engines = _engines_of("ldm-guarded:Guarded")
    assert len(engines) == 1 and engines[0][1] != replica  # a new replica, its own engine


# ------------------------------------------------------------------ scaling out
def _replicas(app: str, deployment: str) -> dict[str, int]:
    """Replicas of ``deployment`` by state, e.g. {"RUNNING": 2}."""
    states = serve.status().applications[app].deployments[deployment].replica_states
    return {str(getattr(state, "value", state)): count for state, count in states.items()}


def _load(url: str, request: dict, stop: threading.Event, seen: list[int]) -> None:
    with httpx.Client(timeout=60) as client:
        while not stop.is_set():
            seen.append(client.post(f"{url}/v1/samples", json=request).status_code)


def _wait_for(app: str, deployment: str, running: int, seconds: float) -> float:
    """Seconds until exactly ``running`` replicas run and none starts or stops."""
    started = time.monotonic()
    while (states := _replicas(app, deployment)) != {"RUNNING": running}:
        assert time.monotonic() - started < seconds, f"still {states} after {seconds} s"
        time.sleep(0.5)
    return time.monotonic() - started


def test_autoscale_adds_a_replica_when_images_wait_and_removes_it_when_idle(app_url, mlflow_server):
    """``ldm serve --autoscale 1:2`` on the two-node cluster (short delays set here). A
    few requests of many images keep images waiting for rows: the request count alone
    (3 requests against a target of 1,000) would never add a replica, the waiting rows
    do; under light load the second replica goes. No request fails during either move."""
    from flows.cli import build_parser
    from flows.cli.serve import app_config_from_args
    from serving.app import SamplerDeployment

    options = ["--autoscale", "1:2", "--model-uri", f"models:/{MODEL_NAME}/1"]
    options += ["--tracking-uri", mlflow_server, "--num-cpus", "0.5", "--max-steps", "20"]
    options += ["--max-rows-per-forward", "4", "--reload-interval-s", "0"]
    config = app_config_from_args(build_parser().parse_args(["serve", *options]))
    quick = {"upscale_delay_s": 1.0, "downscale_delay_s": 4.0, "target_ongoing_requests": 1000}
    quick |= {"metrics_interval_s": 0.5, "look_back_period_s": 2.0}
    scaling = config.autoscaling_config.model_copy(update=quick)
    config = config.model_copy(update={"autoscaling_config": scaling, "torch_threads": 1})
    app = SamplerDeployment.options(name="Scaled", **config.deployment_options()).bind(config)
    serve.run(app, name="ldm-scaled", route_prefix="/scaled")
    url = f"{app_url}/scaled"
    heavy = {"label": 3, "num_samples": 4, "steps": 20}  # a whole forward of 4 rows each
    stop, seen = threading.Event(), []
    workers = [threading.Thread(target=_load, args=(url, heavy, stop, seen)) for _ in range(3)]
    try:
        assert _replicas("ldm-scaled", "Scaled") == {"RUNNING": 1}
        for worker in workers:
            worker.start()
        _wait_for("ldm-scaled", "Scaled", running=2, seconds=90)
        answered_before = len(seen)
        time.sleep(3)  # both replicas answer
        assert len(seen) > answered_before
        stop.set()
        for worker in workers:
            worker.join(60)
        light_stop, light = threading.Event(), []
        light_worker = threading.Thread(target=_hammer, args=(url, light_stop, light))
        light_worker.start()  # one image of 3 steps at a time: under one forward's rows
        try:
            _wait_for("ldm-scaled", "Scaled", running=1, seconds=90)
        finally:
            light_stop.set()
            light_worker.join(60)
    finally:
        stop.set()
        serve.delete("ldm-scaled")
    assert seen and set(seen) == {200}, sorted(set(seen))
    assert light and {status for status, _ in light} == {200}, light
