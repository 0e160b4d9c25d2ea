"""``ldm sample`` against a stand-in HTTP server: the request it sends, the file it
writes, and the messages it prints when the server refuses or is not there."""

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from pydantic import ValidationError

from flows.cli import main
from serving.client import parse_label
from serving.encoding import decode_png, grid_png


class _Handler(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.received.append({"path": self.path, "body": body})
        if body.get("label") == "cat":
            self._send(422, "application/json", b'{"detail": "label: unknown class name"}')
            return
        png = grid_png(np.full((2, 4, 4, 1), 200, np.uint8))
        self._send(
            200,
            "image/png",
            png,
            {
                "X-Model-Name": "ldm",
                "X-Model-Version": "3",
                "X-Seed": "7",
                "X-Labels": "3,3",
                "X-Elapsed-S": "0.25",
            },
        )

    def _send(self, status: int, kind: str, body: bytes, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    _Handler.received = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_labels_that_are_numbers_are_ids():
    assert parse_label("3") == 3 and parse_label("cat") == "cat"


def test_sample_posts_the_request_and_writes_the_grid(server, tmp_path, capsys):
    out = tmp_path / "out.png"
    code = main(
        [
            "sample",
            "--url",
            server,
            "--label",
            "3",
            "--num-samples",
            "2",
            "--guidance-scale",
            "3",
            "--seed",
            "7",
            "-o",
            str(out),
        ]
    )
    assert code == 0
    sent = _Handler.received[0]
    assert sent["path"] == "/v1/samples"
    assert sent["body"] == {
        "label": 3,
        "num_samples": 2,
        "guidance_scale": 3.0,
        "classifier_scale": 0.0,
        "sampler": "ddim",
        "eta": 0.0,
        "format": "png",
        "seed": 7,
    }
    assert decode_png(out.read_bytes()).shape == (8, 14, 1)  # 1 row × 2 columns, padded
    assert "2 images from ldm version 3, seed 7, 0.25 s" in capsys.readouterr().out


def test_sample_shows_the_servers_refusal(server, tmp_path, capsys):
    code = main(["sample", "--url", server, "--label", "cat", "-o", str(tmp_path / "x.png")])
    assert code == 1
    assert "answered 422: label: unknown class name" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_sample_says_when_nothing_listens(tmp_path, capsys):
    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    assert main(["sample", "--url", url, "--labels", "1,2", "-o", str(tmp_path / "x.png")]) == 1
    assert "Is 'ldm serve' running there?" in capsys.readouterr().err


def test_serve_rejects_bad_options_before_starting_ray(capsys):
    assert main(["serve", "--model-uri", "runs:/x", "--max-rows-per-forward", "0"]) == 2
    err = capsys.readouterr().err
    assert "--model-uri" in err and "--max-rows-per-forward" in err


def test_serve_options_reach_the_app_config():
    from flows.cli import build_parser
    from flows.cli.serve import app_config_from_args

    parse = build_parser().parse_args
    default = app_config_from_args(parse(["serve", "--model-uri", "models:/m@champion"]))
    assert default.engine == "process" and default.engine_settings().process
    assert default.store_device == "cpu"  # the engine places its own copy
    threaded = app_config_from_args(
        parse(["serve", "--model-uri", "models:/m@champion", "--engine", "thread"])
    )
    assert threaded.engine == "thread" and not threaded.engine_settings().process
    assert default.engine_settings().deterministic and not default.batch_invariant
    exact = app_config_from_args(
        parse(["serve", "--model-uri", "models:/m@champion", "--batch-invariant"])
    )
    assert exact.engine_settings().batch_invariant
    assert default.decode_width == 32
    assert default.autocast == "auto" and default.engine_settings().autocast == "auto"
    plain = ["serve", "--model-uri", "models:/m@champion", "--autocast", "off"]
    assert app_config_from_args(parse(plain)).engine_settings().autocast_dtype is None
    narrow = ["serve", "--model-uri", "models:/m@champion", "--decode-width", "8"]
    assert app_config_from_args(parse(narrow)).engine_settings().decode_width == 8
    with pytest.raises(ValidationError, match="decode_width"):
        app_config_from_args(parse([*narrow[:-1], "0"]))
    fast = app_config_from_args(
        parse(["serve", "--model-uri", "models:/m@champion", "--fast-kernels"])
    )
    assert not fast.engine_settings().deterministic
    gpu = ["serve", "--model-uri", "models:/m@champion", "--num-gpus", "1"]
    graphed = app_config_from_args(parse(gpu)).engine_settings()
    assert graphed.cuda_graph and graphed.batch_invariant  # a GPU replica's default
    eager = app_config_from_args(parse([*gpu, "--no-cuda-graph"])).engine_settings()
    assert not eager.cuda_graph and eager.batch_invariant
    free = app_config_from_args(parse([*gpu, "--no-batch-invariant"])).engine_settings()
    assert not free.cuda_graph and not free.batch_invariant
    with pytest.raises(ValidationError, match="cuda_graph needs a GPU replica"):
        app_config_from_args(parse(["serve", "--model-uri", "models:/m@champion", "--cuda-graph"]))


def test_the_reason_a_replica_failed_is_found_in_serves_traceback():
    from serving.deploy import root_cause

    message = (
        "ray::ServeReplica:ldm:LDMSampler.initialize_and_get_metadata() (pid=1)\n"
        '  File "/work/main/serving/model_store.py", line 63, in resolve_version\n'
        "    raise RuntimeError(\n"
        "RuntimeError: cannot resolve models:/nosuch@champion at MLflow sqlite:///m.db: "
        "model 'nosuch' has no alias @champion (or does not exist)\n"
    )
    assert root_cause(message) == (
        "RuntimeError: cannot resolve models:/nosuch@champion at MLflow sqlite:///m.db: "
        "model 'nosuch' has no alias @champion (or does not exist)"
    )
    assert root_cause("Failed to update the deployments ['LDMSampler'].") is None
    assert root_cause("") is None
