"""Training-step throughput and model FLOPs utilisation on one NVIDIA GPU: the
denoiser and autoencoder stages and the latent encoding, eager and compiled.

    bash benchmarks/gpu_check.sh [--preset base] [--steps 200] [--runs RUN,RUN,…]
                                 [--profile RUN,…] [--json FILE]

A run is ``stage:mode[@batch]``: stage ``denoiser`` or ``autoencoder`` (the step the Ray
Train loop runs, :class:`training.step.StageStep`: the stage's loss under bf16 autocast,
fused AdamW with warm-up, gradient clipping, and the EMA for the denoiser) or ``encode``
(the latent cache's pass, :func:`training.models.encode_batch`: the encoder's posterior
means under bf16, copied back to the host); batch 0 or none is the preset's. Modes (see
:data:`MODES`): ``eager`` (plain layout), ``eager_cl`` (channels-last),
``compile``/``compile_cl`` (``torch.compile``), ``graphs_cl`` (inductor's CUDA graphs of
the network, ``mode="reduce-overhead"``), ``graph``/``graph_cl`` (the whole step as one
CUDA graph, ``cuda_graph`` in a stage's config), ``graph_compile_cl`` (both: what the
``base`` preset's denoiser runs), ``graph_autotune_cl`` (the same, inductor autotuning
its kernel choices), and ``graph_cl_host``/``graph_cl_pinned`` (batches cut
on the host and copied as the training loop copies them). Other modes make their data on
the GPU. Nothing is downloaded, and the number is the model's, not the data loader's.
Model FLOPs per step are counted once with ``torch.utils.flop_counter`` (forward and
backward of the convolutions, matrix products and attention); MFU is the achieved
rate over the GPU's dense bf16 peak (a table of known GPUs, or ``--peak-tflops``).
``--profile`` adds, for the runs it names, the kernels that take the time and how busy
the GPU was. Needs torch with CUDA, numpy and pydantic; ``gpu_check.sh`` installs
pydantic from wheels when the machine has none.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.utils.flop_counter import FlopCounterMode

from training.config import LDMConfig
from training.losses import autoencoder_losses, denoiser_losses
from training.models import EMA, ENCODE_BATCH, Autoencoder, UNet, encode_batch
from training.optimisation import (
    batches_on_device,
    configure_device,
    make_optimisation,
    memory_format,
    to_device,
)
from training.presets import PRESETS, get_preset
from training.step import StageStep

STAGES = ("denoiser", "autoencoder", "encode")


@dataclass(frozen=True)
class Mode:
    compile: str | None = None  # a torch.compile mode; None: eager
    channels_last: bool = False
    source: str = "gpu"  # where batches come from: see SyntheticData
    graph: bool = False  # the whole step as one CUDA graph (training.step.StageStep)


MODES = {
    "eager": Mode(),
    "eager_cl": Mode(channels_last=True),
    "compile": Mode("default"),
    "compile_cl": Mode("default", True),
    "graphs_cl": Mode("reduce-overhead", True),  # inductor's graphs of the network alone
    "graph": Mode(graph=True),
    "graph_cl": Mode(channels_last=True, graph=True),
    "graph_cl_host": Mode(channels_last=True, source="host", graph=True),
    "graph_cl_pinned": Mode(channels_last=True, source="pinned", graph=True),
    "graph_compile_cl": Mode("default", True, graph=True),
    # the same with inductor's autotuned kernel choices (Triton templates against
    # cuDNN and cuBLAS for each convolution and matrix product); compiles for minutes
    "graph_autotune_cl": Mode("max-autotune-no-cudagraphs", True, graph=True),
}
# the cheap runs first: a compiled one takes about a minute to compile
DEFAULT_RUNS = (
    "denoiser:eager,denoiser:graph_cl,denoiser:graph_cl_pinned,autoencoder:eager,"
    "autoencoder:graph,encode:eager,encode:eager_cl,denoiser:graph_compile_cl,denoiser:compile_cl"
)

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets.
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A10G": 125.0,
    "L40S": 362.0,
    "L4": 121.0,
}


def peak_tflops(device_name: str) -> float | None:
    """The longest table key contained in the CUDA device name, or None."""
    matches = [key for key in PEAK_BF16_TFLOPS if key in device_name]
    return PEAK_BF16_TFLOPS[max(matches, key=len)] if matches else None


class SyntheticData:
    """Class-dependent tensors: a fixed pattern per class plus noise, so the loss has
    something to learn. Pixels are squashed into [-1, 1] like the dataset's images;
    latents are left unit-scale. Source ``gpu``: the pool lives on the device and a
    batch costs one indexing kernel; ``host``: batches are cut on the CPU and copied
    as the training loop copied them (from pageable memory, the host waiting);
    ``pinned``: cut on the CPU and moved by the training loop's
    :func:`training.optimisation.batches_on_device`."""

    def __init__(self, shape, num_classes, pool, device, seed, pixels, source, stage):
        home = device if source == "gpu" else torch.device("cpu")
        g = torch.Generator(device=home).manual_seed(seed)
        patterns = torch.randn(num_classes, *shape, device=home, generator=g)
        self.labels = torch.randint(0, num_classes, (pool,), device=home, generator=g)
        noise = torch.randn(pool, *shape, device=home, generator=g)
        data = 0.8 * patterns[self.labels] + 0.6 * noise
        self.data = torch.tanh(data) if pixels else data
        self.generator, self.device, self.source, self.stage = g, device, source, stage

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.randint(
            0, len(self.labels), (size,), device=self.labels.device, generator=self.generator
        )
        x, y = self.data[index], self.labels[index]
        if self.source == "pinned":
            return next(batches_on_device([(x, y)], self.device, self.stage))
        return to_device(x, self.device, self.stage), y.to(self.device)


@dataclass(frozen=True)
class Run:
    """One measurement: a stage's step in one mode at one batch size (0: the preset's)."""

    stage: str
    mode: str
    batch: int = 0

    @classmethod
    def parse(cls, spec: str) -> Run:
        """``stage:mode`` or ``stage:mode@batch``."""
        head, _, batch = spec.strip().partition("@")
        stage, _, mode = head.partition(":")
        if stage not in STAGES or mode not in MODES or (batch and not batch.isdigit()):
            raise ValueError(
                f"cannot read run {spec!r}: write stage:mode[@batch] with stage in "
                f"{', '.join(STAGES)} and mode in {', '.join(MODES)}"
            )
        return cls(stage, mode, int(batch or 0))

    def __str__(self) -> str:
        return f"{self.stage}:{self.mode}" + (f"@{self.batch}" if self.batch else "")


def build(run: Run, config: LDMConfig, device: torch.device):
    """The network, a function of one batch (the training step, or encoding), its data,
    the batch size and the model FLOPs of one call."""
    mode = MODES[run.mode]
    compile_mode = mode.compile
    diffusion = config.diffusion.build()
    if run.stage == "denoiser":
        net, training, pixels = UNet(config.denoiser), config.denoiser_training, False
        shape = config.latent_shape

        def losses(model, x, y):
            return denoiser_losses(model, diffusion, x, y, config.diffusion, config.num_classes)

    else:
        net, training, pixels = Autoencoder(config.autoencoder), config.autoencoder_training, True
        shape = (config.image_channels, config.image_size, config.image_size)
        kl_weight = config.autoencoder.kl_weight

        def losses(model, x, y):
            return autoencoder_losses(model, x, kl_weight)

    batch = run.batch or (ENCODE_BATCH if run.stage == "encode" else training.batch_size)
    stage = training.model_copy(update={"channels_last": mode.channels_last})
    net = net.to(device, memory_format=memory_format(stage))
    pool = max(8 * batch, 4096)
    data = SyntheticData(
        shape, config.num_classes, pool, device, config.seed, pixels, mode.source, stage
    )
    if run.stage == "encode":  # the latent cache's pass, latents back on the host
        net.eval()
        if compile_mode:
            net.encoder = torch.compile(net.encoder, mode=compile_mode)

        def call(x, y):
            return encode_batch(net, x)

        flops = count_flops(lambda x, y: net.encode_latents(x), data, batch, False)
        return net, call, data, batch, flops

    model = torch.compile(net, mode=compile_mode) if compile_mode else net
    mark_step = (
        torch.compiler.cudagraph_mark_step_begin if compile_mode == "reduce-overhead" else None
    )
    graph = mode.graph and device.type == "cuda"
    optimisation = make_optimisation(net, stage, graph_device=device if graph else None)
    ema = EMA(net, training.ema_decay or 0.9999) if run.stage == "denoiser" else None
    step = StageStep(losses, model, optimisation, ema, stage, device, graph)

    def call(x, y):
        if mark_step is not None:
            mark_step()
        return step(x, y)[0]["loss"].detach()

    flops = count_flops(lambda x, y: losses(net, x, y)["loss"], data, batch, True)
    net.zero_grad(set_to_none=True)
    return net, call, data, batch, flops


def count_flops(fn, data: SyntheticData, batch: int, backward: bool) -> int:
    """Model FLOPs of one call of ``fn`` (and its backward) at this batch size."""
    x, y = data.batch(batch)
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(x.device.type, torch.bfloat16):
            out = fn(x, y)
        if backward:
            out.backward()
    return counter.get_total_flops()


def profile(call, data, batch, device: torch.device, steps: int) -> dict:
    """The kernels that take the device's time over ``steps`` calls, and how busy the
    device was: kernel time over wall time (well under 1 when launches bound the step)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    sync()
    with torch_profile(activities=activities) as prof:
        started = time.perf_counter()
        for _ in range(steps):
            call(*data.batch(batch))
        sync()
        wall_us = (time.perf_counter() - started) * 1e6
    field = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, field, 0) > 0]
    if device.type == "cuda":  # kernels and copies only (a CPU op's device time repeats them)
        events = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(getattr(e, field) for e in events)
    top = sorted(events, key=lambda e: getattr(e, field), reverse=True)[:12]
    return {
        "device_busy": round(total / wall_us, 3) if device.type == "cuda" else None,
        "top": [
            {
                "kernel": e.key[:90],
                "ms_per_step": round(getattr(e, field) / steps / 1000, 3),
                "share": round(getattr(e, field) / total, 3),
                "calls_per_step": round(e.count / steps, 1),
            }
            for e in top
        ],
    }


def measure(run: Run, config: LDMConfig, args, device: torch.device) -> dict:
    torch.manual_seed(config.seed)
    if device.type == "cuda":  # the peak spans warm-up too: a CUDA graph's activations
        torch.cuda.reset_peak_memory_stats()  # are allocated when it is recorded
    net, call, data, batch, flops = build(run, config, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None

    started = time.perf_counter()
    first_loss = None
    for _ in range(args.warmup):
        out = call(*data.batch(batch))
        if first_loss is None and run.stage != "encode":
            first_loss = float(out)
    sync()
    warmup_s = time.perf_counter() - started

    last = None
    started = time.perf_counter()
    for _ in range(args.steps):
        last = call(*data.batch(batch))
    sync()
    seconds = time.perf_counter() - started

    achieved = flops * args.steps / seconds / 1e12
    peak = args.peak_tflops or (
        peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    )
    memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    result = {
        "run": str(run),
        "stage": run.stage,
        "mode": run.mode,
        "batch_size": batch,
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "warmup_s": round(warmup_s, 1),
        "ms_per_step": round(1000 * seconds / args.steps, 2),
        "images_per_s": round(args.steps * batch / seconds, 1),
        "gflops_per_step": round(flops / 1e9, 1),
        "achieved_tflops": round(achieved, 2),
        "peak_bf16_tflops": peak,
        "mfu": round(achieved / peak, 4) if peak else None,
        "peak_memory_gib": round(memory / 2**30, 2),
        "parameters_m": round(sum(p.numel() for p in net.parameters()) / 1e6, 2),
    }
    if run.stage != "encode":
        result |= {"loss_first": round(first_loss, 4), "loss_last": round(float(last), 4)}
    if str(run) in args.profile:
        result["profile"] = profile(call, data, batch, device, args.profile_steps)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="base", choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, default=200, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=30, help="untimed steps first")
    parser.add_argument(
        "--runs",
        default=DEFAULT_RUNS,
        help="comma-separated stage:mode[@batch] (modes: " + ", ".join(MODES) + ")",
    )
    parser.add_argument(
        "--profile",
        default="denoiser:eager,denoiser:graph_compile_cl",
        help="comma-separated runs to profile after timing them ('' for none)",
    )
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=0.0,
        help="dense bf16 peak of this GPU when it is not in the table",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=270.0,
        help="skip the remaining runs once this much time has passed",
    )
    parser.add_argument("--json", default="", help="also write the results here")
    parser.add_argument(
        "--device",
        default="cuda",
        choices=["cuda", "cpu"],
        help="cpu: only check that the script runs (tests)",
    )
    args = parser.parse_args()
    try:
        runs = [Run.parse(spec) for spec in args.runs.split(",") if spec.strip()]
        args.profile = {str(Run.parse(s)) for s in args.profile.split(",") if s.strip()}
    except ValueError as error:
        print(f"gpu_check: {error}")
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible to torch; run it on a GPU machine")
        return 2
    device = torch.device(args.device)
    configure_device(device)  # as a training worker does
    config = get_preset(args.preset)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    header = {
        "date": time.strftime("%Y-%m-%d"),
        "gpu": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "preset": args.preset,
        "latent_shape": list(config.latent_shape),
        "denoiser": config.denoiser.model_dump(),
        "autoencoder": config.autoencoder.model_dump(),
    }
    print(json.dumps(header), flush=True)
    started, results = time.perf_counter(), []
    for run in runs:
        if time.perf_counter() - started > args.budget_s:
            print(f"gpu_check: skipping {run}: the {args.budget_s:.0f} s budget is spent")
            continue
        try:
            result = measure(run, config, args, device)
        except Exception as error:  # a compiler failure must not hide the other figures
            result = {"run": str(run), "error": f"{type(error).__name__}: {error}"[:2000]}
        torch._dynamo.reset()  # each run compiles afresh, at its own shapes
        results.append(result)
        print(json.dumps(result), flush=True)
        if args.json:  # written after every run, so a run cut short keeps what it measured
            Path(args.json).write_text(json.dumps({**header, "results": results}, indent=2))
    print(f"gpu_check: {time.perf_counter() - started:.0f} s in all")
    return 0 if results and all("error" not in r for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
