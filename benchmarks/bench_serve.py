"""Sampling throughput and latency of the Serve app: step-level batching against
request-level batching and unbatched serving, on a uniform and a mixed workload.

    .venv/bin/python benchmarks/bench_serve.py [--preset demo] [--threads 1] [--ingress haproxy]

Registers an untrained model of ``--preset`` in a temporary sqlite MLflow, starts a
local Ray and Serve on 127.0.0.1, and deploys the app once per mode (``--modes``), all
at once; each load is then sent to every mode in turn, ``--repeats`` times, the order
of the modes rotating, and each mode's median images/s is reported with every
repeat's figure beside it (on a shared VM the machine's speed drifts between minutes,
so only modes measured in alternation compare):

- ``step``: step-level batching (``max_rows_per_forward`` 64): requests join at every
  denoising step and share forwards whatever their settings; the sampling loop runs
  in a child process of the replica (``engine: process``, the default);
- ``step-thread``: the same, with the sampling loop in a thread of the replica
  (``engine: thread``), sharing its interpreter with the event loop;
- ``step-invariant``: ``step`` with ``batch_invariant``: every forward padded to the
  full 64 rows, so no image depends on what it is batched with (what that costs);
- ``request``: the same loop with ``join_running`` false, so a batch runs to its
  longest chain before waiting requests start (request-level batching, like the
  ``@serve.batch`` grouping it replaced, except that it also mixes settings);
- ``unbatched``: one image per forward (``max_rows_per_forward`` 1);
- ``step-2-replicas``: step-level batching on two replicas, each reserving half the
  CPUs (scaling out on one machine: each replica is its own process).

Each deployment of one replica reserves ``--cpus`` (logical CPUs: Ray is told of
enough for all; an idle mode uses none); every replica runs ``--threads`` torch
threads. Workloads, each at concurrency 1, 8 and 32 (closed-loop HTTP clients, one
image per request, PNG answers, after a warm-up round; each round lasts ``--seconds``
and counts the requests answered in its steady window, see ``one_round``):

- ``uniform``: DDIM 20 steps, classifier-free guidance w = 3;
- ``mixed``: steps in {10, 20, 50}, samplers in {ddim, dpmpp_2m, ddpm}, w in {0, 1, 3},
  drawn per request from a seeded generator; latencies are reported per step count;
- ``short`` (not in the default): the mixed load's requests all cut to 10 steps, the
  short requests alone at the same concurrency. When a mode ran both loads at one
  concurrency, a last line sets the 10-step requests' p50 in the mix against their
  p50 here: what the long chains cost a short request beside the width it shares.

With ``--ingress haproxy`` Ray starts with Serve's HAProxy ingress
(:mod:`serving.ingress`): HAProxy takes the HTTP port and forwards to each replica's
own HTTP server, and Serve's Python proxy stays as its fallback on a port of its own;
every mode is then measured both ways, "MODE via haproxy" and "MODE via proxy", in
alternation like the modes.

With ``--engine-alone`` each mode of one replica is also measured as "MODE engine
alone": the same clients hand their requests straight to the mode's sampling engine
process, started by this process with the replica's settings (no Ray, no HTTP), in
alternation with the served rounds: what the served path costs beside what the
scheduler and its process boundary cost.

The ceiling (a ``ceiling`` row after each load) is ``model.sample`` in this process at
the same threads, on batches as wide as the load's concurrency (at most 32) of the
load's work (DDIM 20 steps, w = 3 for the uniform load; the mixed load's step counts,
or the short load's 10, with and without guidance, weighted as drawn), measured while
the replicas idle: the images/s the network gives when nothing else runs. It is
measured before every round and after the last, and each round is set against the
mean of the two ceilings either side of it (the last column, each repeat's): the VM's
speed drifts within minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import queue
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import numpy as np
import psutil
import ray
import torch
from mlflow import MlflowClient
from ray import serve

from benchmarks.workloads import (
    MIXED_GUIDANCE,
    MIXED_STEPS,
    SHORT_STEPS,
    UNIFORM,
    WORKLOADS,
    request_settings,
)
from flows.local_stack import free_ports
from serving.app import build_app
from serving.config import AppConfig
from serving.engine import EngineProcess
from serving.ingress import INGRESSES, PORT_ENVS, haproxy_env
from serving.sampler import SampleJob, SampleResult, generators_for
from training.latent_diffusion import LatentDiffusion
from training.mlflow.registry import log_model_version
from training.presets import get_preset

MODEL_NAME = "bench-serve"
MODES = {  # name: AppConfig fields; float32 unless a mode says otherwise
    "step": {"max_rows_per_forward": 64},
    "step-thread": {"max_rows_per_forward": 64, "engine": "thread"},
    "step-invariant": {"max_rows_per_forward": 64, "batch_invariant": True},
    "request": {"max_rows_per_forward": 64, "join_running": False},
    "unbatched": {"max_rows_per_forward": 1},
    "step-2-replicas": {"max_rows_per_forward": 64, "num_replicas": 2},
    # the networks' forward under bf16 autocast (oneDNN's native path on a CPU with
    # AVX512-BF16 or AMX; the app's default there); its ceiling is measured under the
    # same autocast
    "step-bf16": {"max_rows_per_forward": 64, "autocast": "bf16"},
    "unbatched-bf16": {"max_rows_per_forward": 1, "autocast": "bf16"},
}


def build_model(preset: str) -> LatentDiffusion:
    torch.manual_seed(0)
    return LatentDiffusion.build(get_preset(preset).for_data(32, 1, 10)).eval()


def register(root: Path, model: LatentDiffusion) -> str:
    """``model`` as MODEL_NAME@champion in a new sqlite MLflow; the tracking URI."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("bench", artifact_location=str(root / "artifacts"))
    run_id = client.create_run(experiment).info.run_id
    log_model_version(model, uri, run_id, MODEL_NAME, alias="champion")
    return uri


def request_body(workload: str, client: int, index: int) -> dict:
    """The body of request ``index`` of ``client``: the same in every mode."""
    settings = request_settings(workload, client, index)
    return {"label": (client + index) % 10, "seed": client * 1000 + index} | settings


class HttpTarget:
    """A deployed mode, through the HTTP port of its ingress."""

    def __init__(self, url: str):
        self.url = url

    def session(self) -> httpx.Client:
        return httpx.Client(timeout=600)

    def send(self, http: httpx.Client, body: dict) -> float:
        """Sample ``body``; the seconds the replica took."""
        response = http.post(f"{self.url}/v1/samples", json=body)
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {response.text}")
        return float(response.headers["x-elapsed-s"])

    def stats(self) -> dict:
        return httpx.get(f"{self.url}/v1/model").json()["stats"]


class EngineTarget:
    """A mode's sampling engine process, fed by this process: no Ray, no HTTP."""

    def __init__(self, engine: EngineProcess, model: LatentDiffusion):
        self.engine, self.model = engine, model

    def session(self) -> contextlib.nullcontext:
        return contextlib.nullcontext()

    def send(self, _: None, body: dict) -> float:
        job = SampleJob(
            (body["label"],), body["guidance_scale"], 0.0, body["sampler"], body["steps"], 0.0,
            body["seed"],
        )  # fmt: skip
        answers: queue.Queue = queue.Queue()
        self.engine.submit(self.model, job, answers.put)
        outcome = answers.get(timeout=600)
        if not isinstance(outcome, SampleResult):
            raise RuntimeError(f"the engine failed: {outcome}")
        return outcome.report.queued_s + outcome.report.sampling_s

    def stats(self) -> dict:
        return {"forwards": self.engine.stats.forwards, "rows": self.engine.stats.rows}


def one_round(
    target: HttpTarget | EngineTarget, workload: str, concurrency: int, seconds: float
) -> dict:
    """``concurrency`` closed-loop clients sending until ``seconds`` have passed (each
    at least one request): images/s and latencies by steps over the steady window, from
    the moment every client has had its first answer (the first requests all arrive at
    once) to the end. Requests answered outside the window are not counted, so a round does not
    end on a tail of a few clients still busy (with a fixed number of requests per
    client, the mixed load's round ran on until the client that drew the most
    50-step requests finished, at a fraction of the width)."""
    records: list[tuple[float, float, int, float]] = []  # answered, latency, steps, in replica
    first: list[float] = []
    lock = threading.Lock()
    started = time.perf_counter()
    deadline = started + seconds

    def client(index: int) -> None:
        with target.session() as session:
            i = 0
            while i == 0 or time.perf_counter() < deadline:
                body = request_body(workload, index, i)
                sent = time.perf_counter()
                server = target.send(session, body)
                answered = time.perf_counter()
                with lock:
                    records.append((answered, answered - sent, body["steps"], server))
                    if i == 0:
                        first.append(answered)
                i += 1

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, range(concurrency)))
    if seconds <= 0:  # a warm-up: every client sent one request
        return {}
    window_start = max(first)
    if deadline - window_start < seconds / 3:
        raise RuntimeError(
            f"the first answers took {window_start - started:.1f} s of a {seconds:.0f} s round: "
            "give a longer --seconds"
        )
    counted = [r for r in records if window_start < r[0] <= deadline]
    latencies: dict[int, list[float]] = {}
    for _, latency, steps, _ in counted:
        latencies.setdefault(steps, []).append(latency)
    return {
        "images_per_s": len(counted) / (deadline - window_start),
        "requests": len(counted),
        "latencies": latencies,
        "server_p50_s": float(np.percentile([r[3] for r in counted], 50)),
    }


def replicas(mode: str) -> int:
    return MODES[mode].get("num_replicas", 1)


def app_config(args, tracking_uri: str, mode: str) -> dict:
    """The app's settings for ``mode``."""
    return {
        "model_uri": f"models:/{MODEL_NAME}@champion",
        "tracking_uri": tracking_uri,
        "num_cpus": args.cpus / replicas(mode),
        "torch_threads": args.threads,
        "max_ongoing_requests": 64,
        "reload_interval_s": 0,
        "autocast": "off",
    } | MODES[mode]


def engine_alone(args, tracking_uri: str, mode: str, model: LatentDiffusion) -> EngineProcess:
    """A sampling engine process started with ``mode``'s replica settings, ``model`` sent."""
    engine = EngineProcess(AppConfig(**app_config(args, tracking_uri, mode)).engine_settings())
    engine.preload(model)
    return engine


def deploy(args, tracking_uri: str, mode: str) -> str:
    """Deploy the app as ``mode`` under /``mode``; its path."""
    serve.run(build_app(app_config(args, tracking_uri, mode)), name=mode, route_prefix=f"/{mode}")
    return f"/{mode}"


def measure(
    target: HttpTarget | EngineTarget, mode: str, workload: str, concurrency: int, seconds: float
) -> dict:
    """One round against ``target`` after a warm-up round, with the images per forward
    the replica counted during it (one replica only: /v1/model answers from one)."""
    one_round(target, workload, concurrency, 0.0)  # warm-up: one request per client
    before = target.stats()
    result = one_round(target, workload, concurrency, seconds)
    after = target.stats()
    forwards = after["forwards"] - before["forwards"]
    single = replicas(mode) == 1
    mean_rows = f"{(after['rows'] - before['rows']) / forwards:.1f}" if single and forwards else "–"
    return result | {"mean_rows": mean_rows}


def compare(
    args,
    targets: dict[str, tuple[str, HttpTarget | EngineTarget]],
    model: LatentDiffusion,
    workload: str,
    concurrency: int,
) -> tuple[list[dict], dict[str, list[float]]]:
    """Every mode on the same load, ``args.repeats`` times, the order of the modes
    rotating each time, so that none always runs first or last, with the ceiling at
    the same width measured before every round and after the last; one row per mode
    with the median images/s (each repeat's in ``runs``), each repeat against the mean
    of the ceilings either side of it (in its mode's autocast), the latencies of all
    repeats, and the ceilings of each autocast the modes use. ``targets``: a row's
    name → its mode and where its requests go."""
    names = list(targets)
    results: dict[str, list[dict]] = {name: [] for name in names}
    modes = {mode for mode, _ in targets.values()}
    casts = sorted({MODES[mode].get("autocast", "off") for mode in modes}, reverse=True)
    ceilings: dict[str, list[float]] = {cast: [] for cast in casts}

    def measure_ceilings() -> None:
        for cast in casts:
            width = min(32, concurrency)
            ceilings[cast].append(ceiling(model, args.threads, width, workload, cast))

    for repeat in range(args.repeats):
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            measure_ceilings()
            mode, target = targets[name]
            run = measure(target, mode, workload, concurrency, args.seconds)
            results[name].append(run | {"ceiling_before": len(ceilings[casts[0]]) - 1})
    measure_ceilings()
    rows = []
    for name, runs in results.items():
        latencies: dict[int, list[float]] = {}
        for run in runs:
            for steps, values in run["latencies"].items():
                latencies.setdefault(steps, []).extend(values)
        rates = [run["images_per_s"] for run in runs]
        cast = MODES[targets[name][0]].get("autocast", "off")
        around = [np.mean(ceilings[cast][r["ceiling_before"] :][:2]) for r in runs]
        rows.append(
            {
                "mode": name,
                "workload": workload,
                "concurrency": concurrency,
                "requests": sum(run["requests"] for run in runs),
                "images_per_s": float(np.median(rates)),
                "runs": rates,
                "latencies": latencies,
                "server_p50_s": float(np.median([run["server_p50_s"] for run in runs])),
                "mean_rows": runs[-1]["mean_rows"],
                "against_ceiling": [rate / c for rate, c in zip(rates, around, strict=True)],
            }
        )
        print(format_row(rows[-1]), flush=True)
    for cast, values in ceilings.items():
        name = "ceiling" if cast == "off" else f"ceiling-{cast}"
        runs = ", ".join(f"{c:.1f}" for c in values)
        print(f"| {name} | {workload} | {concurrency} | | {np.median(values):.1f} ({runs}) | |")
    return rows, ceilings


def replica_memory(app: str) -> str:
    """Resident memory of each replica process of ``app`` and of its engine child."""
    parts = []
    for process in psutil.process_iter(["cmdline", "memory_info"]):
        if f"ServeReplica:{app}:" not in " ".join(process.info["cmdline"] or []):
            continue
        own = process.info["memory_info"].rss / 2**20
        children = sum(c.memory_info().rss for c in process.children()) / 2**20
        parts.append(f"{own:.0f} + engine {children:.0f}" if children else f"{own:.0f}")
    return ", ".join(parts) or "not found"


def ceiling(
    model: LatentDiffusion, threads: int, width: int, workload: str, autocast: str = "off"
) -> float:
    """Images/s of ``model.sample`` in this process on the load's work, ``width`` images
    a batch: DDIM 20, w = 3 for the uniform load; for the mixed one, each of its step
    counts with and without classifier-free guidance (DDIM; the three samplers take the
    same forwards), weighted as the load draws them. With ``autocast`` "bf16" the whole
    of ``model.sample`` runs under it (the replica decodes in float32: a ceiling no
    lower than the served work's)."""
    torch.set_num_threads(threads)
    labels = torch.arange(width) % 10

    def seconds(steps: int, guidance: float) -> float:
        def run() -> None:
            with torch.autocast("cpu", torch.bfloat16, enabled=autocast == "bf16"):
                model.sample(
                    labels,
                    guidance_scale=guidance,
                    sampler=UNIFORM["sampler"],
                    steps=steps,
                    generator=generators_for(0, width),
                )

        run()  # warm-up
        started = time.perf_counter()
        run()
        return time.perf_counter() - started

    if workload == "uniform":
        return width / seconds(UNIFORM["steps"], UNIFORM["guidance_scale"])
    guided = sum(w > 0 for w in MIXED_GUIDANCE) / len(MIXED_GUIDANCE)
    steps = MIXED_STEPS if workload == "mixed" else (SHORT_STEPS,)
    mean = np.mean([(1 - guided) * seconds(s, 0.0) + guided * seconds(s, 3.0) for s in steps])
    return width / float(mean)


def format_row(r: dict) -> str:
    by_steps = ", ".join(
        f"{steps}: {np.percentile(v, 50):.2f} / {np.percentile(v, 99):.2f}"
        for steps, v in sorted(r["latencies"].items())
    )
    runs = ", ".join(f"{rate:.1f}" for rate in r["runs"])
    return (
        f"| {r['mode']} | {r['workload']} | {r['concurrency']} | {r['requests']} | "
        f"{r['images_per_s']:.1f} ({runs}) | {by_steps} | {r['server_p50_s']:.2f} | "
        f"{r['mean_rows']} | {', '.join(f'{a:.2f}' for a in r['against_ceiling'])} |"
    )


def short_requests_against_alone(rows: list[dict]) -> None:
    """For each mode and concurrency measured on both the mixed and the short load:
    the short requests' p50 in the mix over their p50 in the short load."""
    short = SHORT_STEPS
    alone = {(r["mode"], r["concurrency"]): r for r in rows if r["workload"] == "short"}
    for r in rows:
        other = alone.get((r["mode"], r["concurrency"]))
        if r["workload"] != "mixed" or other is None or short not in r["latencies"]:
            continue
        in_mix = np.percentile(r["latencies"][short], 50)
        by_themselves = np.percentile(other["latencies"][short], 50)
        print(
            f"{r['mode']}, {r['concurrency']} clients: {short}-step requests p50 "
            f"{in_mix:.2f} s in the mixed load against {by_themselves:.2f} s alone at the "
            f"same concurrency: {in_mix / by_themselves:.2f}x",
            flush=True,
        )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="demo", choices=("tiny", "demo"))
    parser.add_argument("--seconds", type=float, default=15.0, help="per round")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--workloads", nargs="+", default=["uniform", "mixed"], choices=WORKLOADS)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per mode and load")
    parser.add_argument(
        "--ingress",
        choices=INGRESSES,
        default="proxy",
        help="haproxy: Serve runs HAProxy on the HTTP port; each mode is then measured "
        "through it and through Serve's proxy (HAProxy's fallback, on a port of its own), "
        "in alternation",
    )
    parser.add_argument(
        "--engine-alone",
        action="store_true",
        help="also measure each one-replica mode's sampling engine fed by this process "
        "(no Ray, no HTTP), in alternation with the served rounds",
    )
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    began = time.perf_counter()
    model = build_model(args.preset)
    print(
        "| mode | workload | concurrency | requests | images/s, median (each repeat) | "
        "p50 / p99 latency (s) by steps | p50 in the replica (s) | mean images per forward | "
        "against the ceiling, each repeat |"
    )
    print("|---|---|---:|---:|---:|---|---:|---:|---|")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tracking_uri = register(Path(tmp), model)
        if args.ingress == "haproxy":  # read by Ray's processes when they start
            os.environ.update(haproxy_env(Path(tmp) / "haproxy", free_ports(len(PORT_ENVS))))
        # Every mode is deployed at once and idle while another is measured; the CPUs
        # Ray is told of are logical, enough for all of them.
        ray.init(address="local", num_cpus=args.cpus * len(args.modes), include_dashboard=False)
        port = free_port()
        engines: list[EngineProcess] = []
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        try:
            paths = {mode: deploy(args, tracking_uri, mode) for mode in args.modes}
            ports = {"": port}
            if args.ingress == "haproxy":
                proxy = os.environ["RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"]
                ports = {" via haproxy": port, " via proxy": proxy}
            targets: dict[str, tuple[str, HttpTarget | EngineTarget]] = {
                f"{mode}{through}": (mode, HttpTarget(f"http://127.0.0.1:{at}{path}"))
                for mode, path in paths.items()
                for through, at in ports.items()
            }
            if args.engine_alone:
                for mode in args.modes:
                    if replicas(mode) == 1:
                        engines.append(engine_alone(args, tracking_uri, mode, model))
                        targets[f"{mode} engine alone"] = (mode, EngineTarget(engines[-1], model))
            for workload in args.workloads:
                for concurrency in args.concurrency:
                    rows += compare(args, targets, model, workload, concurrency)[0]
            short_requests_against_alone(rows)
            for mode in args.modes:
                print(f"{mode}: replica memory (RSS, MiB): {replica_memory(mode)}", flush=True)
        finally:
            for engine in engines:
                engine.close()
            serve.shutdown()
            ray.shutdown()
    print(
        f"\n{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"ray {ray.__version__}; preset {args.preset}, {args.threads} torch thread(s); "
        f"ingress {args.ingress}; {time.perf_counter() - began:.0f} s in all"
    )


if __name__ == "__main__":
    main()
