"""Small models and checks shared by the engine tests."""

from __future__ import annotations

import torch
from torch import nn


class LayerBank(nn.Module):
    """Independent layers, each fed its own input: any mix of shapes without shape chaining."""

    def __init__(self, specs: list[tuple]):
        super().__init__()
        layers = []
        for spec in specs:
            if spec[0] == "linear":
                layers.append(nn.Linear(spec[1], spec[2]))
            elif spec[0] == "conv":
                layers.append(nn.Conv2d(spec[1], spec[2], spec[3], padding=spec[3] // 2))
            elif spec[0] == "gru":
                layers.append(nn.GRU(spec[1], spec[2], batch_first=True))
            else:
                raise ValueError(spec)
        self.layers = nn.ModuleList(layers)
        self.specs = specs

    def inputs(self, gen: torch.Generator, batch: int = 4) -> list[torch.Tensor]:
        xs = []
        for spec in self.specs:
            if spec[0] == "linear":
                xs.append(torch.randn(batch, spec[1], generator=gen))
            elif spec[0] == "conv":
                xs.append(torch.randn(batch, spec[1], 5, 5, generator=gen))
            else:
                xs.append(torch.randn(batch, 3, spec[1], generator=gen))
        return xs

    def loss(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return self(xs)

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        total = 0.0
        for layer, x in zip(self.layers, xs):
            y = layer(x)
            if isinstance(y, tuple):
                y = y[0]
            total = total + (y - 1.0).pow(2).mean()
        return total


def train_steps(model, optimizer, engine, steps: int, seed: int = 0, check=None) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss = model.loss(model.inputs(gen))
        loss.backward()
        optimizer.step()
        engine.step()
        optimizer.zero_grad(set_to_none=True)
        if check is not None:
            check()


def state_tensors(optimizer, p):
    inner = getattr(optimizer, "optimizer", optimizer)
    return [v for v in inner.state.get(p, {}).values() if torch.is_tensor(v) and v.shape == p.shape]


def invariant_problems(engine, optimizer) -> list[str]:
    problems = list(engine.check_invariants())
    for name, p in engine.named_parameters():
        inactive = ~engine.masks[name]
        for s in state_tensors(optimizer, p):
            if bool((s[inactive] != 0).any()):
                problems.append(f"{name}: optimiser state non-zero at inactive positions")
    return problems
