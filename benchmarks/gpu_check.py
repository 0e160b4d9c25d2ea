"""Denoiser-stage throughput and model FLOPs utilisation on one NVIDIA GPU.

    bash benchmarks/gpu_check.sh [--preset base] [--steps 300] [--batch-size N]
                                 [--modes eager,compile] [--json FILE]

Runs the preset's denoiser stage with the step the Ray Train loop runs
(``training.losses.denoiser_losses`` under bf16 autocast, AdamW with warm-up,
gradient clipping, EMA) on latents made on the GPU, so nothing is downloaded and
the number is the model's, not the data loader's. Model FLOPs per step are
counted once with ``torch.utils.flop_counter`` (forward and backward of the
convolutions, matrix products and attention); MFU is the achieved rate over the
GPU's dense bf16 peak (a table of known GPUs, or ``--peak-tflops``).
Needs torch with CUDA, numpy and pydantic; ``gpu_check.sh`` installs pydantic
from wheels when the machine has none.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.utils.flop_counter import FlopCounterMode

from training.config import LDMConfig
from training.losses import denoiser_losses
from training.models import EMA, UNet
from training.optimisation import make_optimisation
from training.presets import PRESETS, get_preset

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


class SyntheticLatents:
    """Class-dependent latents on the GPU: a fixed pattern per class plus noise, so the
    loss has something to learn and every batch costs one indexing kernel."""

    def __init__(self, config: LDMConfig, pool: int, device: torch.device, seed: int):
        g = torch.Generator(device=device).manual_seed(seed)
        shape = config.latent_shape
        patterns = torch.randn(config.num_classes, *shape, device=device, generator=g)
        self.labels = torch.randint(0, config.num_classes, (pool,), device=device, generator=g)
        noise = torch.randn(pool, *shape, device=device, generator=g)
        self.latents = 0.8 * patterns[self.labels] + 0.6 * noise
        self.generator = g

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.randint(
            0, len(self.labels), (size,), device=self.labels.device, generator=self.generator
        )
        return self.latents[index], self.labels[index]


def step_fn(model, optimisation, ema, diffusion, config, device: torch.device):
    def step(z0: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        model.train()
        with torch.autocast(device.type, torch.bfloat16):
            loss = denoiser_losses(model, diffusion, z0, y, config.diffusion, config.num_classes)
        grad_norm = optimisation.step(loss["loss"], model)
        ema.update(model)
        return loss["loss"].detach(), grad_norm

    return step


def count_flops(unet: UNet, diffusion, config: LDMConfig, data: SyntheticLatents, batch: int):
    """FLOPs of one forward + backward of the denoiser loss at this batch size."""
    z0, y = data.batch(batch)
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(z0.device.type, torch.bfloat16):
            loss = denoiser_losses(unet, diffusion, z0, y, config.diffusion, config.num_classes)
        loss["loss"].backward()
    unet.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def run_mode(mode: str, config: LDMConfig, args, device: torch.device) -> dict:
    torch.manual_seed(config.seed)
    training = config.denoiser_training
    batch = args.batch_size or training.batch_size
    diffusion = config.diffusion.build()
    unet = UNet(config.denoiser).to(device)
    data = SyntheticLatents(config, pool=max(8 * batch, 4096), device=device, seed=config.seed)
    flops = count_flops(unet, diffusion, config, data, batch)
    optimisation = make_optimisation(unet, training)
    ema = EMA(unet, training.ema_decay)
    model = torch.compile(unet) if mode == "compile" else unet
    step = step_fn(model, optimisation, ema, diffusion, config, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None

    started = time.perf_counter()
    first_loss = None
    for _ in range(args.warmup):
        loss, _ = step(*data.batch(batch))
        first_loss = float(loss) if first_loss is None else first_loss
    sync()
    warmup_s = time.perf_counter() - started
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    losses = []
    started = time.perf_counter()
    for i in range(args.steps):
        loss, _ = step(*data.batch(batch))
        if i % 50 == 0 or i == args.steps - 1:
            losses.append(loss)
    sync()
    seconds = time.perf_counter() - started

    achieved = flops * args.steps / seconds / 1e12
    peak = args.peak_tflops or (
        peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    )
    memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return {
        "mode": mode,
        "batch_size": batch,
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "warmup_s": round(warmup_s, 1),
        "ms_per_step": round(1000 * seconds / args.steps, 2),
        "images_per_s": round(args.steps * batch / seconds, 1),
        "gflops_per_step": round(flops / 1e9, 1),
        "achieved_tflops": round(achieved, 1),
        "peak_bf16_tflops": peak,
        "mfu": round(achieved / peak, 4) if peak else None,
        "peak_memory_gib": round(memory / 2**30, 2),
        "loss_first": round(first_loss, 4),
        "loss_last": round(float(losses[-1]), 4),
        "parameters_m": round(sum(p.numel() for p in unet.parameters()) / 1e6, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="base", choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, default=300, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=30, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=0, help="default: the preset's")
    parser.add_argument(
        "--modes",
        default="eager,compile",
        help="comma-separated: eager (what training runs), compile",
    )
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
        help="skip the remaining modes once this much time has passed",
    )
    parser.add_argument("--json", default="", help="also write the results here")
    parser.add_argument(
        "--device",
        default="cuda",
        choices=["cuda", "cpu"],
        help="cpu: only check that the script runs (tests)",
    )
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible to torch; run it on a GPU machine")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    device = torch.device(args.device)
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
    }
    print(json.dumps(header))
    started, results = time.perf_counter(), []
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        if mode not in ("eager", "compile"):
            print(f"gpu_check: unknown mode {mode!r}; use eager or compile")
            return 2
        if time.perf_counter() - started > args.budget_s:
            print(f"gpu_check: skipping {mode}: the {args.budget_s:.0f} s budget is spent")
            continue
        try:
            result = run_mode(mode, config, args, device)
        except Exception as error:  # a compiler failure must not hide the eager figure
            result = {"mode": mode, "error": f"{type(error).__name__}: {error}"[:2000]}
        results.append(result)
        print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps({**header, "results": results}, indent=2))
    print(f"gpu_check: {time.perf_counter() - started:.0f} s in all")
    return 0 if results and all("error" not in r for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
