"""``sparsediff train-autoencoder --preset P --out DIR``: the first stage of a latent diffusion preset.

Trains a small diffusers ``AutoencoderKL`` (``first_stage.args``) on the preset's training images with
a reconstruction loss (MSE + L1) plus a tiny KL term (``first_stage.kl_weight``; LPIPS would need
downloaded weights, so it is not used), measures the reconstruction error on the held-out split, sets
the latent scale to 1 / std of the training latents, and saves a diffusers directory that
``first_stage.path`` can point at. An existing complete directory is reused unless ``--force``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .config import RunConfig
from .errors import ConfigError
from .models.autoencoder import META_FILE, FirstStage, small_kl_autoencoder
from .progress import progress_bar
from .sparse import derive_seed


def _images_in_memory(cfg: RunConfig, split: str, limit: int | None = None) -> torch.Tensor:
    """Float images (N, C, H, W) in [-1, 1] of a split (the datasets the first stage trains on are small
    enough at CPU scale; paper-scale users bring a pretrained first stage)."""
    from .data.images import build_image_dataset

    ds = build_image_dataset(cfg.data, split)
    n = len(ds) if limit is None else min(limit, len(ds))
    if hasattr(ds, "images"):  # in-memory uint8 dataset: convert in one go
        return ds.images[:n].float().div(127.5).sub(1.0)
    return torch.stack([ds[i] for i in range(n)])


def is_complete(out: Path) -> bool:
    """Whether ``out`` holds a saved first stage (diffusers config, weights and sparsediff's metadata)."""
    return (out / "config.json").exists() and (out / META_FILE).exists() and any(out.glob("*.safetensors"))


def train_autoencoder(
    cfg: RunConfig, out: str | Path, steps: int | None = None, force: bool = False, quiet: bool = False
) -> dict[str, Any]:
    """Train the preset's first stage into ``out`` (reused when complete, unless ``force``); its metadata."""
    out = Path(out)
    if is_complete(out) and not force:
        meta = json.loads((out / META_FILE).read_text())
        if not quiet:
            print(
                f"reusing the first stage in {out} (val MSE {meta.get('val_mse', float('nan')):.4f}); "
                "--force retrains it"
            )
        return meta
    spec = cfg.first_stage
    if spec.kind not in ("autoencoder-kl", "none", "pretrained"):
        raise ConfigError(f"first_stage.kind {spec.kind!r} cannot be trained here")
    steps = steps or spec.steps
    torch.manual_seed(cfg.train.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args = {"in_channels": cfg.data.channels, "sample_size": cfg.data.image_size, **spec.args}
    vae = small_kl_autoencoder(**args).to(device)
    train_x = _images_in_memory(cfg, "train")
    val_x = _images_in_memory(cfg, "val", limit=2000)
    opt = torch.optim.AdamW(vae.parameters(), lr=spec.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=spec.lr * 0.1)
    t0 = time.perf_counter()
    vae.train()
    with progress_bar(total=steps, desc="train autoencoder", quiet=quiet) as bar:
        for step in range(1, steps + 1):
            g = torch.Generator().manual_seed(derive_seed(cfg.train.seed, "autoencoder", step))
            idx = torch.randint(0, train_x.shape[0], (spec.batch_size,), generator=g)
            x = train_x[idx].to(device)
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g).to(device)
            rec = vae.decode(z).sample
            loss = F.mse_loss(rec, x) + 0.1 * F.l1_loss(rec, x) + spec.kl_weight * posterior.kl().mean()
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if not quiet and step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
            bar.update()
    seconds = time.perf_counter() - t0
    vae.eval()
    fs = FirstStage(vae)
    with torch.no_grad():
        rec = torch.cat(
            [
                fs.vae.decode(fs.encode_unscaled(val_x[i : i + 500].to(device))).sample.cpu()
                for i in range(0, len(val_x), 500)
            ]
        )
        val_mse = F.mse_loss(rec, val_x).item()
    fs.estimate_scale(train_x[:5000].to(device))
    fs.meta = {
        "preset": cfg.name,
        "dataset": cfg.data.name,
        "image_size": cfg.data.image_size,
        "steps": steps,
        "train_seconds": seconds,
        "val_mse": val_mse,
        "val_psnr_db": float(10 * torch.log10(torch.tensor(4.0 / max(val_mse, 1e-12)))),
        "latent_shape": list(fs.latent_shape(cfg.data.image_size)),
        "args": args,
    }
    out.mkdir(parents=True, exist_ok=True)
    fs.cpu().save(out)
    if not quiet:
        print(
            f"first stage saved to {out}: latents {tuple(fs.latent_shape(cfg.data.image_size))}, "
            f"scale {fs.scale:.4f}, val MSE {val_mse:.4f} ({fs.meta['val_psnr_db']:.1f} dB), {seconds:.0f}s"
        )
    return {**fs.meta, "scale": fs.scale}
