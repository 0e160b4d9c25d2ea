"""The console lines of a training stage and the pictures logged beside the metrics."""

from __future__ import annotations

import io

import numpy as np

from training.images import make_grid
from training.plots import label_rows, loss_curves
from training.progress import StageProgress, format_duration


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_line_says_stage_step_loss_speed_and_time_left():
    clock, out = Clock(), io.StringIO()
    progress = StageProgress("denoiser", 1500, images_per_step=128, out=out, clock=clock)
    clock.now += 50.0  # 100 steps in 50 s: 2 steps/s, 256 images/s, 1400 steps left
    assert progress.update(100, 0.04123) == (
        "denoiser     100/1500    7%  loss 0.0412  256 img/s  ETA 11m40s"
    )
    assert out.getvalue().endswith("ETA 11m40s\n")


def test_lines_come_every_tenth_of_the_stage_or_minute_and_at_the_end():
    clock, out = Clock(), io.StringIO()
    progress = StageProgress("autoencoder", 1000, 64, out=out, clock=clock)
    printed = []
    for step in range(50, 1001, 50):  # a logging interval every 50 steps, 1 s apart
        clock.now += 1.0
        if progress.update(step, 0.5):
            printed.append(step)
    assert printed == [50, 150, 250, 350, 450, 550, 650, 750, 850, 950, 1000]
    slow = StageProgress("classifier", 10_000, 64, out=out, clock=clock)
    slow.update(10, 1.0)
    clock.now += 61.0
    assert slow.update(20, 1.0) is not None  # a minute of silence is enough


def test_a_resumed_stage_measures_its_speed_from_where_it_resumed():
    clock = Clock()
    progress = StageProgress("denoiser", 1000, 10, start_step=800, out=io.StringIO(), clock=clock)
    clock.now += 10.0
    assert progress.line(900, 0.1).endswith("100 img/s  ETA 10s")


def test_durations_read_naturally():
    assert [format_duration(s) for s in (9, 65, 3700, -1)] == ["9s", "1m05s", "1h01m", "0s"]


def test_grid_rows_are_named_on_the_left():
    images = np.full((6, 8, 8, 1), 128, np.uint8)
    grid = make_grid(images, ncols=2)  # 3 rows of 2
    named = label_rows(grid, ["zero", "one", "two"])
    width = named.shape[1] - grid.shape[1]
    assert named.shape[0] == grid.shape[0] and named.shape[2] == 3 and width > 8
    assert (named[:, width:, 0] == grid[..., 0]).all()  # the grid itself is unchanged
    label = named[:, :width, 0]
    row = (grid.shape[0] - 2) // 3
    for r in range(3):  # every row has text beside it
        assert (label[2 + r * row : 2 + (r + 1) * row] > 128).any()


def test_loss_curves_draw_one_panel_per_stage():
    history = {"autoencoder": [(5, 0.6), (10, 0.4)], "denoiser": [(5, 0.9), (10, 0.7)]}
    one = loss_curves({"denoiser": history["denoiser"]})
    two = loss_curves(history)
    assert two.dtype == np.uint8 and two.shape[2] == 3
    assert two.shape[1] > 1.5 * one.shape[1] and two.std() > 10
