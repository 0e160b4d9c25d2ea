"""A stage trained in channels-last memory format follows the same losses as one in the
default format (up to summation order), and its weights save as plain safetensors."""

import numpy as np
import torch

from data.reader import to_pixels
from training.checkpoints import StageState, load_checkpoint, save_checkpoint
from training.losses import autoencoder_losses
from training.models import Autoencoder
from training.optimisation import make_optimisation, memory_format, to_device
from training.presets import get_preset


def _train(channels_last: bool, steps: int = 4):
    config = get_preset("tiny").for_data(32, 1, 10)
    training = config.autoencoder_training.model_copy(update={"channels_last": channels_last})
    torch.manual_seed(0)
    net = Autoencoder(config.autoencoder).to(memory_format=memory_format(training))
    optimisation = make_optimisation(net, training)
    x = torch.rand((8, 1, 32, 32), generator=torch.Generator().manual_seed(1)) * 2 - 1
    losses = []
    for _ in range(steps):
        batch = to_device(x, "cpu", training)
        loss = autoencoder_losses(net, batch, config.autoencoder.kl_weight)["loss"]
        optimisation.step(loss, net)
        losses.append(float(loss.detach()))
    return net, optimisation, config, batch, losses


def test_channels_last_trains_the_same_steps_and_saves_plain_weights(tmp_path):
    plain_net, _, _, _, plain = _train(False)
    net, optimisation, config, batch, last = _train(True)
    assert batch.is_contiguous(memory_format=torch.channels_last)
    wide = [
        name
        for name, p in net.named_parameters()
        if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] > 1
    ]
    params, plain_params = dict(net.named_parameters()), dict(plain_net.named_parameters())
    assert wide and all(
        params[n].is_contiguous(memory_format=torch.channels_last)
        and not plain_params[n].is_contiguous(memory_format=torch.channels_last)
        for n in wide
    )
    torch.testing.assert_close(torch.tensor(last), torch.tensor(plain), rtol=1e-4, atol=1e-5)
    state = StageState(
        "autoencoder",
        4,
        0,
        4,
        net.state_dict(),
        optimisation.optimizer.state_dict(),
        optimisation.scheduler.state_dict(),
    )
    save_checkpoint(tmp_path, state, config)
    loaded, _ = load_checkpoint(tmp_path)
    for name, value in net.state_dict().items():  # the same values, in plain layout
        assert loaded.model[name].is_contiguous() and torch.equal(loaded.model[name], value)


def test_batches_reach_the_network_in_the_stage_s_layout():
    """One-channel images permuted from [B, H, W, 1] count as contiguous while their
    strides read as channels-last (bf16 convolutions then ran 2.6× slower): pixels and
    batches come out with plain NCHW strides unless the stage asks for channels-last."""
    plain_strides = (1024, 1024, 32, 1)
    images = np.zeros((5, 32, 32), np.uint8)
    assert to_pixels(images).stride()[1:] == plain_strides[1:]
    assert to_pixels(np.zeros((5, 32, 32, 3), np.uint8)).is_contiguous()
    ambiguous = torch.zeros(5, 32, 32, 1).permute(0, 3, 1, 2)
    assert ambiguous.stride()[1] == 1  # the layout that was slow
    training = get_preset("demo").autoencoder_training
    for channels_last in (False, True):
        stage = training.model_copy(update={"channels_last": channels_last})
        batch = to_device(ambiguous, "cpu", stage)
        expected = (1024, 1, 32, 1) if channels_last else plain_strides
        assert batch.stride() == expected, channels_last
