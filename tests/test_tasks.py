"""The Task contract: what train, sample and evaluate call, and the family hooks behind it."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from sparsediff.config import RunConfig
from sparsediff.diffusion import sample
from sparsediff.errors import ConfigError
from sparsediff.tasks import (
    TASKS,
    LatentDiffusionTask,
    Samples,
    Sampling,
    StrokeDiffusionTask,
    Task,
    TrainData,
    make_task,
)


class Points(TrainData):
    def __init__(self, x: torch.Tensor):
        self.x = x  # (N, 2)

    def __len__(self) -> int:
        return len(self.x)

    def batch(self, indices: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        return {"x0": self.x[indices].to(device)}


class PointTask(Task):
    """A toy family: 2-d points, every call recorded."""

    family = "points"

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.calls: list[str] = []

    def prepare_train_data(self, progress: bool) -> None:
        self.calls.append("prepare")

    def load_train_data(self, device: torch.device) -> TrainData:
        self.calls.append("load")
        return Points(torch.arange(8.0).view(4, 2))

    def draw_samples(self, model: nn.Module, sampling: Sampling) -> Samples:
        batches = list(sampling.batches())
        x = torch.cat([sampling.denoise(model, self.schedule, (len(b), 2)) for b in batches])
        return Samples(images=x, extras={"batches": batches})

    def reference_images(self, n: int | None = None) -> torch.Tensor:
        return torch.zeros(n or 1, 1, 2, 2, dtype=torch.uint8)


def zero_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x)


def test_make_task_picks_the_family_of_the_config():
    assert dict(TASKS) == {"ldm": LatentDiffusionTask, "chirodiff": StrokeDiffusionTask}
    assert isinstance(make_task(RunConfig()), LatentDiffusionTask)
    with pytest.raises(ConfigError, match="unknown model family 'gan'; choose ldm or chirodiff"):
        make_task(dataclasses.replace(RunConfig(), family="gan"))


def test_a_family_implements_the_hooks_or_cannot_be_made():
    class Half(Task):
        family = "half"

        def load_train_data(self, device: torch.device) -> TrainData:
            return Points(torch.zeros(1, 2))

    with pytest.raises(TypeError, match="abstract"):
        Half(RunConfig())


def test_train_data_prepares_on_the_main_process_and_waits_for_it():
    task = PointTask(RunConfig())
    data = task.train_data(torch.device("cpu"), barrier=lambda: task.calls.append("barrier"))
    assert task.calls == ["prepare", "barrier", "load"] and len(data) == 4
    task.calls.clear()
    task.train_data(torch.device("cpu"), is_main=False, barrier=lambda: task.calls.append("barrier"))
    assert task.calls == ["barrier", "load"]


def test_loss_is_the_epsilon_mse_with_the_family_options():
    task = PointTask(RunConfig())
    batch = task.train_data(torch.device("cpu")).batch(torch.arange(4), torch.device("cpu"))
    loss = task.loss(zero_eps, batch, torch.Generator().manual_seed(0))
    noise = torch.randn(4, 2, generator=_after_timesteps(4, task.schedule.num_timesteps, seed=0))
    assert torch.allclose(loss, noise.pow(2).mean())  # the zero predictor's error is the noise itself
    task.loss_options = lambda b: {"mask": torch.tensor([[1.0, 0.0]] * 4)}  # the second coordinate left out
    loss = task.loss(zero_eps, batch, torch.Generator().manual_seed(0))
    assert torch.allclose(loss, noise[:, 0].pow(2).mean())


def _after_timesteps(n: int, num_timesteps: int, seed: int) -> torch.Generator:
    """A generator in the state :func:`epsilon_loss` leaves it in before it draws the noise."""
    gen = torch.Generator().manual_seed(seed)
    torch.randint(0, num_timesteps, (n,), generator=gen)
    return gen


def test_generate_checks_the_number_and_walks_the_batches_in_order():
    task = PointTask(RunConfig())
    kw = dict(sampler="ddim", steps=2, eta=1.0, batch_size=3, device=torch.device("cpu"), progress=False)
    out = task.generate(zero_eps, 7, torch.Generator().manual_seed(4), **kw)
    assert out.extras["batches"] == [range(0, 3), range(3, 6), range(6, 7)]
    # batch by batch from one generator, in order: the same as sampling each batch in turn by hand
    gen = torch.Generator().manual_seed(4)
    by_hand = [
        sample(zero_eps, task.schedule, (n, 2), sampler="ddim", steps=2, eta=1.0, generator=gen)
        for n in (3, 3, 1)
    ]
    assert torch.equal(out.images, torch.cat(by_hand))
    with pytest.raises(ConfigError, match="must be positive, got 0"):
        task.generate(zero_eps, 0, torch.Generator(), **kw)
