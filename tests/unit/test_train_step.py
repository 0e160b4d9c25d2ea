"""The stage step: one code path for the trainers, when it runs as a CUDA graph, and the
bookkeeping a graph needs (the learning rate in a tensor the graph reads, the
diffusion's tables on the device) surviving checkpoints and pickling."""

import copy
import pickle

import pytest
import torch

from training.checkpoints import StageState, load_checkpoint, save_checkpoint
from training.models import EMA
from training.optimisation import make_optimisation
from training.presets import get_preset
from training.stages import get_stage
from training.step import StageStep, uses_cuda_graph


def _denoiser(graph_device=None):
    config = get_preset("tiny").for_data(32, 1, 10)
    training = config.denoiser_training.model_copy(update={"warmup_steps": 10})
    torch.manual_seed(0)
    stage = get_stage("denoiser")
    net = stage.build(config)
    optimisation = make_optimisation(net, training, graph_device=graph_device)
    diffusion = config.diffusion.build()
    step = StageStep(
        lambda model, x, y: stage.losses(model, x, y, diffusion, config),
        net,
        optimisation,
        EMA(net, 0.9),
        training,
        torch.device("cpu"),
    )
    return config, net, optimisation, step


def _batches(config, count, seed):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(count):
        z0 = torch.randn(4, *config.latent_shape, generator=generator)
        yield z0, torch.randint(0, config.num_classes, (4,), generator=generator)


def test_the_step_is_the_loss_the_update_the_ema_and_the_schedule():
    config, net, optimisation, step = _denoiser()
    reference = copy.deepcopy(net)
    ref_optimisation = make_optimisation(
        reference, config.denoiser_training.model_copy(update={"warmup_steps": 10})
    )
    ref_ema, diffusion = EMA(reference, 0.9), config.diffusion.build()
    for x, y in _batches(config, 3, seed=1):
        torch.manual_seed(5)
        losses, grad_norm = step(x, y)
        torch.manual_seed(5)
        ref_losses = get_stage("denoiser").losses(reference, x, y, diffusion, config)
        ref_norm = ref_optimisation.step(ref_losses["loss"], reference)
        ref_ema.update(reference)
        assert torch.equal(losses["loss"], ref_losses["loss"])
        assert torch.equal(grad_norm, ref_norm)
    for mine, theirs in zip(net.parameters(), reference.parameters(), strict=True):
        assert torch.equal(mine, theirs)
    for mine, theirs in zip(step.ema.model.parameters(), ref_ema.model.parameters(), strict=True):
        assert torch.equal(mine, theirs)
    # the rate the next (4th) step takes: 4/10 of the way through the warm-up
    assert optimisation.learning_rate == pytest.approx(
        4 / 10 * config.denoiser_training.learning_rate
    )


def test_a_graph_is_used_only_on_one_cuda_device_and_when_asked():
    asked = get_preset("base").denoiser_training  # the GPU preset asks for it
    not_asked = get_preset("demo").denoiser_training
    cuda = torch.device("cuda", 0)
    assert uses_cuda_graph(asked, cuda, world=1)
    assert not uses_cuda_graph(not_asked, cuda, world=1)
    assert not uses_cuda_graph(asked, torch.device("cpu"), world=1)
    assert not uses_cuda_graph(asked, cuda, world=8)  # DDP's all-reduce is not captured


def test_the_rate_a_graph_reads_follows_the_schedule_and_survives_a_checkpoint(tmp_path):
    """With ``graph_device`` the rate is one tensor that the schedule fills in place (a
    captured AdamW reads it at each replay); a checkpoint stores it as a number, and
    loading refills the same tensor, so a resumed stage keeps the exact schedule."""
    config, net, optimisation, step = _denoiser(graph_device=torch.device("cpu"))
    rate = optimisation.optimizer.param_groups[0]["lr"]
    assert isinstance(rate, torch.Tensor)
    for x, y in _batches(config, 4, seed=1):
        step(x, y)
    assert optimisation.optimizer.param_groups[0]["lr"] is rate
    assert float(rate) == pytest.approx(5 / 10 * config.denoiser_training.learning_rate)

    state = StageState(
        "denoiser",
        4,
        0,
        4,
        net.state_dict(),
        optimisation.optimizer.state_dict(),
        optimisation.scheduler.state_dict(),
        step.ema.state_dict(),
    )
    save_checkpoint(tmp_path, state, config)  # JSON: the tensor became a number
    loaded, _ = load_checkpoint(tmp_path)
    _, resumed_net, resumed, resumed_step = _denoiser(graph_device=torch.device("cpu"))
    resumed_rate = resumed.optimizer.param_groups[0]["lr"]
    resumed_net.load_state_dict(loaded.model)
    resumed.load_state_dict(loaded.optimizer, loaded.scheduler)
    assert resumed.optimizer.param_groups[0]["lr"] is resumed_rate
    assert float(resumed_rate) == float(rate)

    for x, y in _batches(config, 2, seed=2):  # both continue alike
        torch.manual_seed(7)
        step(x, y)
        torch.manual_seed(7)
        resumed_step(x, y)
        assert float(resumed_rate) == float(rate)
    for mine, theirs in zip(net.parameters(), resumed_net.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs)


def test_the_diffusion_copies_its_tables_to_a_device_once_and_pickles_without_them():
    diffusion = get_preset("tiny").diffusion.build()
    x0, t = torch.randn(3, 4, 8, 8), torch.tensor([0, 5, 99])
    noise = torch.randn_like(x0)
    first = diffusion.q_sample(x0, t, noise)
    tables = dict(diffusion._device_tables)
    second = diffusion.q_sample(x0, t, noise)
    assert torch.equal(first, second) and len(tables) == 2
    assert all(diffusion._device_tables[k] is v for k, v in tables.items())  # not copied again
    expected = (
        float(diffusion.sqrt_alphas_cumprod[5]) * x0[1]
        + float(diffusion.sqrt_one_minus_alphas_cumprod[5]) * noise[1]
    )
    torch.testing.assert_close(first[1], expected)
    copy_of = pickle.loads(pickle.dumps(diffusion))
    assert copy_of._device_tables == {} and diffusion._device_tables
    assert torch.equal(copy_of.q_sample(x0, t, noise), first)
