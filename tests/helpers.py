"""What several test modules share: small models and engine checks, the tiny presets, child processes.

Fixtures live in ``conftest.py``; plain functions and constants live here (``from helpers import ...``),
so that no test module imports another one (or ``conftest``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch import nn

from sparsediff.checkpoint import load_tensors
from sparsediff.config import RunConfig, load_config
from sparsediff.run import RunDir

TESTS = Path(__file__).resolve().parent
SCRIPTS = TESTS / "scripts"
CONFIGS = TESTS / "configs"
# The tiny latent-diffusion preset (Fashion-MNIST subset, tiny autoencoder and UNet): seconds per run.
TINY_LDM = str(CONFIGS / "tiny-ldm.yaml")
PYTHON = sys.executable


# ---------------------------------------------------------------------------- child processes


def python_env() -> dict[str, str]:
    """Environment for child processes: the package importable, few threads."""
    env = dict(os.environ)
    src = str(TESTS.parent / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONHASHSEED"] = "0"
    return env


def torchrun(nproc: int, *args: str) -> list[str]:
    """The command line that runs ``args`` (a script, or ``-m module ...``) on ``nproc`` local ranks."""
    return [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]


# ---------------------------------------------------------------------------- tiny latent diffusion runs


def tiny_ldm(first_stage: Path, **sections: dict) -> RunConfig:
    """The tiny-ldm preset on ``first_stage``, with ``sections`` (``train={"max_steps": 4}``) merged in."""
    overrides: dict[str, dict] = {"first_stage": {"path": str(first_stage)}}
    for section, values in sections.items():
        overrides.setdefault(section, {}).update(values)
    return load_config(TINY_LDM, overrides)


def train_args(first_stage: Path, out: Path, method: str, steps: int, *extra: str) -> list[str]:
    """Arguments of ``python`` (or of :func:`torchrun`) for ``sparsediff train`` of the tiny preset:
    ``method`` at sparsity 0.5 with a topology update every 2 steps, ``steps`` steps, quiet."""
    args = ["-m", "sparsediff", "train", "--preset", TINY_LDM, "--first-stage", str(first_stage)]
    args += ["--method", method, "--sparsity", "0.5", "--update-every", "2", "--steps", str(steps)]
    return [*args, "--out", str(out), "--quiet", *extra]


CHECKPOINT_FILES = ("model", "ema", "optimizer", "engine")  # the tensor files of a checkpoint


def checkpoint_tensors(ckpt: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The tensors of checkpoint directory ``ckpt``, file by file: model, EMA, optimiser and engine."""
    return {name: load_tensors(ckpt / f"{name}.safetensors")[0] for name in CHECKPOINT_FILES}


def assert_same_checkpoints(a: Path, b: Path, key=lambda t: t) -> None:
    """Checkpoint directories ``a`` and ``b`` hold the same tensors under the same names (compared as
    ``key(tensor)``: a tensor's bits, say, to tell -0.0 and NaN payloads apart)."""
    sa, sb = checkpoint_tensors(a), checkpoint_tensors(b)
    for name in sa:
        assert sa[name].keys() == sb[name].keys(), name
        for k in sa[name]:
            assert torch.equal(key(sa[name][k]), key(sb[name][k])), f"{name}:{k}"


def assert_same_state(a: Path, b: Path) -> None:
    """The latest checkpoints of runs ``a`` and ``b`` hold the same tensors, bit for bit."""
    ca, cb = RunDir(a).checkpoints.latest(), RunDir(b).checkpoints.latest()
    assert ca is not None and cb is not None, f"{a} or {b} has no checkpoint"
    assert_same_checkpoints(ca, cb)


# ---------------------------------------------------------------------------- engine tests


def mlp_run(
    steps: int,
    *,
    sizes: tuple[int, int, int] = (16, 64, 8),
    batch: int = 32,
    compiled: bool = False,
    resume_from: tuple | None = None,
    after_step=None,
    **sparse,
):
    """A seeded two-layer MLP trained to optimiser step ``steps`` on seeded inputs (AdamW, loss: the squared
    output), sparsified with ``sparse`` (``sparsify`` keywords; default RigL at 90 %, 40 total steps, an
    update every 4): ``(engine, model, optimizer, [after_step(engine) after each step])``.

    ``compiled``: the forward through ``torch.compile`` (aot_eager). ``resume_from``: ``(model, optimizer,
    engine state)`` to go on from, loaded as the trainer resumes (weights, optimiser, then the engine).
    """
    import sparsediff

    sparse = {"method": "rigl", "sparsity": 0.9, "total_steps": 40, "update_every": 4, **sparse}
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(sizes[0], sizes[1]), nn.ReLU(), nn.Linear(sizes[1], sizes[2]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine = sparsediff.sparsify(model, opt, **sparse)
    if resume_from is not None:
        saved_model, saved_opt, state = resume_from
        model.load_state_dict(saved_model.state_dict())
        opt.load_state_dict(saved_opt.state_dict())
        engine.load_state_dict(state)
    forward = torch.compile(model, backend="aot_eager") if compiled else model
    seen = []
    for s in range(engine.step_count, steps):
        x = torch.randn(batch, sizes[0], generator=torch.Generator().manual_seed(s))
        forward(x).pow(2).mean().backward()
        opt.step()
        engine.step()
        opt.zero_grad()
        if after_step is not None:
            seen.append(after_step(engine))
    return engine, model, opt, seen


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
            if bool((engine.dense_view(name, s)[inactive] != 0).any()):
                problems.append(f"{name}: optimiser state non-zero at inactive positions")
    return problems


def tiny_unet() -> nn.Module:
    """A diffusers ``UNet2DModel`` small enough for CPU tests (inputs ``(B, 4, 8, 8)``, with attention)."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8,
        norm_num_groups=8,
    )


# ---------------------------------------------------------------------------- tracker files


def wandb_records(path: Path) -> list:
    """The records (``wandb_internal_pb2.Record``) of one ``run-<id>.wandb`` file of an offline W&B run.

    The file is W&B's transaction log: a 7-byte header (``:W&B``, magic 0xBEE1, version 0), then 32 KiB
    blocks of chunks, each ``crc32c (4) | length (2, little-endian) | type (1: full, 2: first, 3: middle,
    4: last)`` and its payload; a block's last bytes are zero padding when a chunk header no longer fits.
    Read here without W&B's service, so that a test sees what the file holds.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B transaction log")
    block, pos, pending, out = 32 * 1024, 7, b"", []
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:  # padding at the end of a block
            pos += room
            continue
        length = int.from_bytes(data[pos + 4 : pos + 6], "little")
        kind = data[pos + 6]
        if kind == 0 and length == 0:  # zero padding
            pos += room
            continue
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            out.append(rec)
            pending = b""
    return out


def wandb_history(run_dir: Path) -> list[dict]:
    """Every history row of the offline W&B runs in ``RUN/wandb`` (in file order): key -> value."""
    import json

    rows = []
    for path in sorted(Path(run_dir, "wandb").glob("offline-run-*/run-*.wandb")):
        for rec in wandb_records(path):
            if rec.WhichOneof("record_type") == "history":
                rows.append(
                    {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
                )
    return rows
