"""The sampling engine on one GPU: images/s at 1, 32 and 128 concurrent requests in
float32 (deterministic or not, batch-invariant or not) and under bf16/fp16 autocast,
and how reproducible an image is in each.

    python benchmarks/gpu_serve_check.py [--preset demo] [--steps 20] [--json FILE]
    (a smoke run without a GPU: --device cpu --concurrency 1 4 --steps 4)

Runs :class:`serving.scheduler.StepScheduler` in this process (what a replica runs,
without HTTP) on an untrained model of ``--preset`` whose output layer is perturbed so
the network matters.

Modes (``--modes``; by default ``fp32_graph``, ``fp32_graph_decode1`` and ``fp32``):

- ``fp32``: deterministic kernels in full float32 (what
  :func:`serving.engine.configure_torch` sets on a GPU engine), unpadded and eager
  (``--no-batch-invariant``);
- ``fp32_tf32``: cuDNN's defaults, TF32 convolutions and its fastest algorithms
  (``--fast-kernels --no-batch-invariant``);
- ``fp32_strict``: TF32 off, cuDNN's algorithms free (tells TF32 from the algorithms);
- ``fp32_invariant``: ``fp32`` with every forward at the replica's full width
  (``batch_invariant``; ``--no-cuda-graph``);
- ``fp32_graph``: ``fp32_invariant`` with the denoiser replayed as a CUDA graph
  (``cuda_graph``; a GPU replica's default; on the CPU it runs as ``fp32_invariant``);
- ``fp32_graph_decode1``: ``fp32_graph`` decoding one image a call, as each request
  is decoded when the batch is not invariant (in this process only; the throughput
  loads are one-image requests, so this is one decoder call per request);
- ``bf16``, ``fp16``: ``fp32`` with the networks under autocast.

For each mode:

- throughput: ``c`` one-image requests (DDIM ``--steps``, classifier-free guidance
  w = 3) submitted at once and stepped to the end, for c in 1, 32, 128, after a
  warm-up; images/s = c / wall time, with the GPU replica's default cap of 256 rows
  per forward (``--width``; so ``fp32_invariant`` pays its padding at low load);
  ``engine_images_per_s``: the same through :class:`serving.engine.EngineProcess`,
  the scheduler in a child process as a replica runs it (weights sent as bytes,
  images answered over a socket), so the price of the process boundary is seen at
  GPU step times (not for ``fp32_strict``, which no engine setting gives);
- short requests in a mixed load (``--latency-modes``, default ``fp32_graph``, through
  the engine process): ``--latency-clients`` closed-loop clients (default 32) send
  ``bench_serve.py``'s mixed load (steps in {10, 20, 50}, samplers and w mixed, one
  image each) for ``--latency-seconds``; then the same load's requests cut to 10
  steps are sent by one client alone, and by as many clients as the mix (the short
  requests alone at the mix's width). Reports p50/p99 latency by step count,
  images/s, and the short requests' p50 in the mix over their p50 in each of the
  other two (the goal: at most 2);
- reproducibility: six requests of mixed samplers, steps and guidance, each sampled
  alone and then in a mix that joins a running chain mid-way; the largest pixel
  difference and the share of differing pixels (the tolerance of
  ``serving/sampler.py``: ±2 levels on at most 1% of the pixels), and the same
  between the mode and a first ``fp32`` run (for the fp32 modes: run to run).

Needs torch, numpy and pydantic (``gpu_check.sh`` shows how to install pydantic
offline from wheels); downloads nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from benchmarks.workloads import MIXED_STEPS, SHORT_STEPS, request_settings
from serving.engine import EngineProcess, EngineSettings
from serving.sampler import SampleJob, SampleResult
from serving.scheduler import DECODE_WIDTH, StepScheduler
from training.latent_diffusion import LatentDiffusion
from training.presets import PRESETS, get_preset

# cuBLAS reads this at its first handle; the deterministic modes need it.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@dataclass(frozen=True)
class Mode:
    autocast: str = "off"
    deterministic: bool = True  # deterministic kernels, no TF32 (the serving default)
    tf32: bool = False  # only without deterministic: cuDNN's TF32 convolutions
    batch_invariant: bool = False
    cuda_graph: bool = False  # with batch_invariant: denoiser and decoder as CUDA graphs
    decode_width: int = DECODE_WIDTH  # images per decoder call
    engine: bool = True  # also through the engine process

    @property
    def dtype(self) -> torch.dtype | None:
        return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.autocast]

    def apply(self) -> None:
        """This process's kernels as the engine would set them (reversibly)."""
        torch.backends.cudnn.allow_tf32 = self.tf32 and not self.deterministic
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.deterministic = self.deterministic
        torch.use_deterministic_algorithms(self.deterministic, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = False  # as configure_torch


MODES = {
    "fp32": Mode(),
    "fp32_tf32": Mode(deterministic=False, tf32=True),
    "fp32_strict": Mode(deterministic=False, engine=False),
    "fp32_invariant": Mode(batch_invariant=True),
    "fp32_graph": Mode(batch_invariant=True, cuda_graph=True),
    "fp32_graph_decode1": Mode(batch_invariant=True, cuda_graph=True, decode_width=1, engine=False),
    "bf16": Mode("bf16"),
    "fp16": Mode("fp16"),
}
DEFAULT_MODES = ["fp32_graph", "fp32_graph_decode1", "fp32"]
REPLICA_WIDTH = 256  # a GPU replica's default max_rows_per_forward (--width)
MIX = [
    SampleJob((3, 3), 3.0, 0.0, "ddim", 20, 0.0, 1),
    SampleJob((1,), 0.0, 0.0, "ddim", 20, 0.0, 2),
    SampleJob((7, 2, 5), 0.0, 1.0, "ddim", 20, 0.0, 3),
    SampleJob((4,), 0.0, 0.0, "ddpm", 10, 0.0, 4),
    SampleJob((0, 9), 0.0, 0.0, "ddim", 15, 0.5, 5),
    SampleJob((6, 8), 1.5, 0.5, "dpmpp_2m", 12, 0.0, 6),
]


def build_model(preset: str, device: str) -> LatentDiffusion:
    torch.manual_seed(0)
    model = LatentDiffusion.build(get_preset(preset).for_data(32, 1, 10))
    with torch.no_grad():  # a fresh UNet predicts ε = 0; make the weights matter
        model.denoiser.conv_out.weight.normal_(0, 0.05)
    for net in (model.autoencoder, model.denoiser, model.classifier):
        net.to(device)
    return model.eval()


def run(model: LatentDiffusion, jobs: list[SampleJob], mode: Mode, width: int, head=None) -> list:
    """Images of ``jobs`` (submitted together; after three steps of ``head`` if given)."""
    scheduler = StepScheduler(
        max_rows_per_forward=width,
        autocast=mode.dtype,
        batch_invariant=mode.batch_invariant,
        cuda_graph=mode.cuda_graph,
        decode_width=mode.decode_width,
    )
    outcomes: dict[int, SampleResult] = {}
    if head is not None:
        scheduler.submit(model, head, lambda outcome: outcomes.setdefault(-1, outcome))
        for _ in range(3):
            scheduler.step()
    for key, job in enumerate(jobs):
        scheduler.submit(model, job, lambda outcome, key=key: outcomes.setdefault(key, outcome))
    while scheduler.step():
        pass
    failures = [o for o in outcomes.values() if not isinstance(o, SampleResult)]
    if failures:
        raise RuntimeError(f"sampling failed: {failures[0]}")
    return [outcomes[key].images for key in range(len(jobs))]


def difference(a: list[np.ndarray], b: list[np.ndarray]) -> dict[str, float]:
    diffs = [np.abs(x.astype(int) - y.astype(int)) for x, y in zip(a, b, strict=True)]
    return {
        "max_levels": int(max(d.max() for d in diffs)),
        "share_differing": float(np.mean(np.concatenate([(d > 0).ravel() for d in diffs]))),
    }


def throughput(
    model: LatentDiffusion, mode: Mode, concurrency: int, steps: int, device: str, cap: int
) -> float:
    jobs = [SampleJob((i % 10,), 3.0, 0.0, "ddim", steps, 0.0, i) for i in range(concurrency)]
    width = max(cap, 2 * concurrency)
    run(model, jobs, mode, width)  # warm-up: kernels, autotuning, allocator
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    run(model, jobs, mode, width)
    if device == "cuda":
        torch.cuda.synchronize()
    return concurrency / (time.perf_counter() - started)


def engine_settings(mode: Mode, width: int, device: str) -> EngineSettings:
    """What a replica of ``mode`` at ``width`` rows hands its engine process."""
    return EngineSettings(
        width,
        True,
        mode.autocast,
        1,
        device,
        batch_invariant=mode.batch_invariant,
        cuda_graph=mode.cuda_graph,
        deterministic=mode.deterministic,
        decode_width=mode.decode_width,
    )


def engine_throughput(
    model: LatentDiffusion, mode: Mode, concurrency: int, steps: int, device: str, cap: int
) -> float:
    """:func:`throughput` through the engine process (a warm-up round, then one timed)."""
    engine = EngineProcess(engine_settings(mode, max(cap, 2 * concurrency), device))
    try:
        engine.preload(model)

        def round_trip(seed: int) -> float:
            done = threading.Semaphore(0)
            started = time.perf_counter()
            for i in range(concurrency):
                job = SampleJob((i % 10,), 3.0, 0.0, "ddim", steps, 0.0, seed + i)
                engine.submit(model, job, lambda outcome: done.release())
            for _ in range(concurrency):
                if not done.acquire(timeout=600):
                    raise RuntimeError("the engine did not answer within 600 s")
            return concurrency / (time.perf_counter() - started)

        round_trip(0)  # warm-up: the child's kernels, autotuning, allocator
        return round_trip(1000)
    finally:
        engine.close()


def closed_loop(
    engine: EngineProcess, model: LatentDiffusion, clients: int, seconds: float, short: bool
) -> tuple[list[tuple[int, float]], float]:
    """``clients`` closed-loop clients of the mixed load for ``seconds`` (each sends its
    next request when its last is answered; ``short``: every request cut to the load's
    fewest steps). Returns (steps, latency in s) per answered request and the wall time
    until the last answer."""
    started, records, lock = time.perf_counter(), [], threading.Lock()
    errors: list[str] = []

    def client(k: int) -> None:
        index = 0
        while time.perf_counter() - started < seconds and not errors:
            settings = request_settings("short" if short else "mixed", k, index)
            steps = settings["steps"]
            job = SampleJob(
                ((k + index) % 10,), settings["guidance_scale"], 0.0, settings["sampler"],
                steps, 0.0, k * 1000 + index,
            )  # fmt: skip
            answers: queue.Queue = queue.Queue()
            sent = time.perf_counter()
            engine.submit(model, job, answers.put)
            try:
                outcome = answers.get(timeout=600)
            except queue.Empty:
                outcome = "no answer in 600 s"
            if not isinstance(outcome, SampleResult):
                errors.append(f"request {job} failed: {outcome}")
                return
            with lock:
                records.append((steps, time.perf_counter() - sent))
            index += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(errors[0])
    return records, time.perf_counter() - started


def mixed_latency(
    model: LatentDiffusion, mode: Mode, device: str, cap: int, clients: int, seconds: float
) -> dict:
    """Latency by step count in the mixed load, and the short requests' p50 there
    against the same short requests sent by one client, and by as many clients as the
    mix, through the engine process."""
    engine = EngineProcess(engine_settings(mode, cap, device))
    try:
        engine.preload(model)
        closed_loop(engine, model, clients, min(seconds, 3.0), short=False)  # warm-up
        alone, _ = closed_loop(engine, model, 1, seconds, short=True)
        same_width, _ = closed_loop(engine, model, clients, seconds, short=True)
        mixed, wall = closed_loop(engine, model, clients, seconds, short=False)
    finally:
        engine.close()

    def quantiles(records: list[tuple[int, float]], steps: int) -> tuple[float, float]:
        latencies = [latency for s, latency in records if s == steps]
        return tuple(round(float(np.quantile(latencies, q)), 4) for q in (0.5, 0.99))

    short = SHORT_STEPS
    by_steps = {s: quantiles(mixed, s) for s in MIXED_STEPS if any(r[0] == s for r in mixed)}
    p50_alone = quantiles(alone, short)[0]
    p50_same_width = quantiles(same_width, short)[0]
    in_mix = by_steps.get(short, (None,))[0]
    return {
        "clients": clients,
        "requests": len(mixed),
        "images_per_s": round(len(mixed) / wall, 1),
        "p50_p99_s_by_steps": by_steps,
        "short_p50_alone_s": p50_alone,
        "short_p50_ratio": round(in_mix / p50_alone, 2) if in_mix else None,
        "short_p50_same_width_s": p50_same_width,
        "short_p50_ratio_same_width": round(in_mix / p50_same_width, 2) if in_mix else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--modes", nargs="+", default=DEFAULT_MODES, choices=list(MODES))
    parser.add_argument(
        "--width", type=int, default=REPLICA_WIDTH, help="max_rows_per_forward (default 256)"
    )
    parser.add_argument(
        "--latency-modes", nargs="*", default=["fp32_graph"], choices=list(MODES),
        help="modes whose short-request latency in a mixed load is measured",
    )  # fmt: skip
    parser.add_argument("--latency-clients", type=int, default=32)
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_serve_check: no CUDA device; use --device cpu for a smoke run")
    model = build_model(args.preset, args.device)
    name = torch.cuda.get_device_name() if args.device == "cuda" else platform.machine()
    print(f"{name}; torch {torch.__version__}; preset {args.preset}; DDIM {args.steps}, w = 3")
    head = SampleJob((1, 2), 0.0, 0.0, "dpmpp_2m", 24, 0.0, 10)
    MODES["fp32"].apply()
    reference = [run(model, [job], MODES["fp32"], args.width)[0] for job in MIX]
    results = []
    for name in args.modes:
        mode = MODES[name]
        mode.apply()
        row: dict = {"mode": name}
        try:  # a mode that fails is recorded with its error; the others still run
            alone = [run(model, [job], mode, args.width)[0] for job in MIX]
            mixed = run(model, MIX, mode, args.width, head=head)
            row["mixed_vs_alone"] = difference(mixed, alone)
            row["vs_fp32"] = difference(alone, reference)
            row["images_per_s"] = {
                c: round(throughput(model, mode, c, args.steps, args.device, args.width), 1)
                for c in args.concurrency
            }
            row["engine_images_per_s"] = (
                {
                    c: round(
                        engine_throughput(model, mode, c, args.steps, args.device, args.width), 1
                    )
                    for c in args.concurrency
                }
                if mode.engine
                else None
            )
            if name in args.latency_modes:
                row["mixed_latency"] = mixed_latency(
                    model, mode, args.device, args.width, args.latency_clients,
                    args.latency_seconds,
                )  # fmt: skip
        except Exception as error:  # reported in the row and on stderr
            traceback.print_exc()
            row["error"] = f"{type(error).__name__}: {error}"
        results.append(row)
        print(json.dumps(row), flush=True)
        if args.json:  # after every mode, so a run cut short keeps what it measured
            Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
