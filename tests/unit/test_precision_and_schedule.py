"""A stage's precision (bf16 autocast where it pays) and learning-rate schedule (warm-up,
then constant or cosine decay): what each setting does, on every device kind, and that a
resumed stage continues the same schedule."""

import math

import pytest
import torch

from training import optimisation as opt
from training.config import StageConfig
from training.latent_diffusion import LatentDiffusion
from training.local import train_stage
from training.losses import autoencoder_losses
from training.models import Autoencoder
from training.presets import get_preset


def _stage(**changes) -> StageConfig:
    return StageConfig(steps=100, batch_size=8, learning_rate=1e-2, warmup_steps=10, **changes)


def test_warm_up_then_constant_or_cosine_to_zero():
    constant, cosine = _stage(), _stage(lr_decay="cosine")
    for stage in (constant, cosine):  # the same linear warm-up
        assert [opt.lr_factor(stage, s) for s in range(10)] == pytest.approx(
            [(s + 1) / 10 for s in range(10)]
        )
    assert all(opt.lr_factor(constant, s) == 1.0 for s in range(10, 100))
    decay = [opt.lr_factor(cosine, s) for s in range(9, 100)]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False))  # strictly falling
    assert 0.0 < decay[-1] < 1e-3  # the last step still moves, barely
    # halfway between the warm-up and the end: half the rate
    assert opt.lr_factor(cosine, 9 + 45) == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 91)))


def test_the_optimiser_follows_the_schedule_and_a_resumed_one_continues_it():
    stage = _stage(lr_decay="cosine")
    net = torch.nn.Linear(2, 1)
    optimisation = opt.make_optimisation(net, stage)
    seen = []
    for step in range(60):
        seen.append(optimisation.learning_rate)
        optimisation.step(net(torch.ones(1, 2)).sum(), net)
        if step == 29:
            saved = optimisation.scheduler.state_dict(), optimisation.optimizer.state_dict()
    assert seen == pytest.approx([1e-2 * opt.lr_factor(stage, s) for s in range(60)])
    resumed = opt.make_optimisation(net, stage)
    resumed.scheduler.load_state_dict(saved[0])
    resumed.optimizer.load_state_dict(saved[1])
    assert resumed.learning_rate == pytest.approx(seen[30])


def test_which_precision_runs_where(monkeypatch):
    auto, fp32, bf16 = _stage(), _stage(precision="fp32"), _stage(precision="bf16")
    for native in (True, False):
        monkeypatch.setattr(opt, "cpu_has_native_bf16", lambda native=native: native)
        assert opt.autocast_dtype(auto, "cpu") is None  # today's CPU default: fp32
        assert opt.autocast_dtype(fp32, "cpu") is None
        # bf16 on a CPU only where it is native: emulated bf16 is slower than fp32
        assert opt.autocast_dtype(bf16, "cpu") == (torch.bfloat16 if native else None)
    for stage in (auto, bf16):  # a GPU: bf16 autocast unless fp32 is asked for
        assert opt.autocast_dtype(stage, "cuda") == torch.bfloat16
    assert opt.autocast_dtype(fp32, "cuda") is None
    with pytest.raises(ValueError, match="precision"):
        _stage(precision="fp16")


def test_bf16_computes_convolutions_in_bf16_keeps_fp32_weights_and_follows_fp32(monkeypatch):
    monkeypatch.setattr(opt, "cpu_has_native_bf16", lambda: True)  # emulated where not native
    config = get_preset("tiny").for_data(32, 1, 10)
    x = torch.rand((16, 1, 32, 32), generator=torch.Generator().manual_seed(1)) * 2 - 1
    curves = {}
    for precision in ("fp32", "bf16"):
        training = config.autoencoder_training.model_copy(update={"precision": precision})
        torch.manual_seed(0)
        net = Autoencoder(config.autoencoder)
        optimisation = opt.make_optimisation(net, training)
        conv_dtypes = set()
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.register_forward_hook(
                    lambda m, i, out, seen=conv_dtypes: seen.add(out.dtype)
                )
        curves[precision] = []
        for _ in range(10):
            with opt.autocast(training, "cpu"):
                loss = autoencoder_losses(net, x, config.autoencoder.kl_weight)["loss"]
            assert loss.dtype == torch.float32
            optimisation.step(loss, net)
            curves[precision].append(float(loss.detach()))
        assert conv_dtypes == {torch.bfloat16 if precision == "bf16" else torch.float32}
        assert all(p.dtype == torch.float32 for p in net.parameters())
    fp32, bf16 = torch.tensor(curves["fp32"]), torch.tensor(curves["bf16"])
    assert not torch.equal(fp32, bf16)  # it did run in another precision
    torch.testing.assert_close(bf16, fp32, rtol=0.03, atol=0.0)  # and learns alike
    assert bf16[-1] < bf16[0]


def test_a_bf16_stage_trains_in_process_in_bf16_to_fp32_weights(monkeypatch):
    monkeypatch.setattr(opt, "cpu_has_native_bf16", lambda: True)
    config = get_preset("tiny").for_data(32, 1, 10)
    training = config.denoiser_training.model_copy(
        update={"precision": "bf16", "lr_decay": "cosine"}
    )
    config = config.model_copy(update={"denoiser_training": training})
    model = LatentDiffusion.build(config)
    before = {k: v.clone() for k, v in model.denoiser.state_dict().items()}
    conv_dtypes = set()
    for module in model.denoiser.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(lambda m, i, out: conv_dtypes.add(out.dtype))
    z = torch.randn((32, *config.latent_shape), generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 10, (32,), generator=torch.Generator().manual_seed(3))
    model = train_stage("denoiser", model, z, y, seed=0)
    assert conv_dtypes == {torch.bfloat16}  # the in-process trainer ran it in bf16
    after = model.denoiser.state_dict()
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_a_gpu_worker_autotunes_its_kernels_and_a_cpu_one_changes_nothing():
    flags = (torch.backends.cudnn, "benchmark"), (torch.backends.cuda.matmul, "allow_tf32")
    before = [getattr(owner, name) for owner, name in flags]
    try:
        for owner, name in flags:
            setattr(owner, name, False)
        opt.configure_device("cpu")
        assert [getattr(owner, name) for owner, name in flags] == [False, False]
        opt.configure_device(torch.device("cuda"))  # sets flags only; needs no GPU
        assert [getattr(owner, name) for owner, name in flags] == [True, True]
    finally:
        for (owner, name), value in zip(flags, before, strict=True):
            setattr(owner, name, value)
