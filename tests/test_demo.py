"""The demo's report writer and the engine-only demo (the full demo is `make demo`, not a unit test)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from sparsediff.config import load_config
from sparsediff.demo import engine_demo, write_report
from sparsediff.run import RunDir


def _eval(tmp_path: Path, name: str, fid: float, nonzero: int, metric: str, sampler: str) -> dict:
    grid = tmp_path / f"{name}-grid.png"
    Image.new("L", (8, 8)).save(grid)
    return {
        "fid": {"metric": metric, "value": fid},
        "params_nonzero": nonzero,
        "params_total": 1000,
        "flops_per_sample_sparse": 5e8 if nonzero < 1000 else 1e9,
        "flops_per_sample_dense": 1e9,
        "flops_train_total": 2e12 if nonzero < 1000 else 4e12,
        "train_seconds": 61.0,
        "sampler": {"sampler": sampler, "steps": 50, "eta": 0.0, "seed": 0},
        "grid": str(grid),
    }


def test_report_has_a_table_and_grids_per_family(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    ldm = [
        (
            "dense",
            0.0,
            "dense",
            out / "dense",
            _eval(tmp_path, "a", 21.5, 1000, "fid_sparsediff_fmnist", "ddim"),
        ),
        (
            "rigl",
            0.5,
            "sparse",
            out / "rigl-50-sparse",
            _eval(tmp_path, "b", 23.25, 510, "fid_sparsediff_fmnist", "ddim"),
        ),
    ]
    chiro = [
        (
            "dense",
            0.0,
            "dense",
            out / "kanjivg" / "dense",
            _eval(tmp_path, "c", 3.0, 1000, "fid_sparsediff_strokes", "ddpm"),
        ),
        (
            "rigl",
            0.5,
            "dense",
            out / "kanjivg" / "rigl-50",
            _eval(tmp_path, "d", 4.0, 500, "fid_sparsediff_strokes", "ddpm"),
        ),
    ]
    ldm[1][4]["sampling_time"] = {"dense": 3.0, "sparse": 1.2, "speedup": 2.5}
    ldm[1][4]["train_seconds"] = 30.5
    ae = {"latent_shape": [4, 8, 8], "val_mse": 0.0163, "val_psnr_db": 23.9}
    # the sparsest run drew grids while it trained
    during = RunDir(out / "rigl-50-sparse")
    during.write_config(load_config("ldm-fmnist"))
    during.write_summary({"sample_grid_seconds": 1.5, "train_seconds": 30.5})
    for step in (500, 1000):
        Image.new("L", (8, 8)).save(
            during.during_dir.mkdir(parents=True, exist_ok=True) or during.during_dir / f"step-{step:08d}.png"
        )
    path = write_report(out, [("ldm", ldm), ("chirodiff", chiro)], ae, seconds=600.0)
    text = path.read_text()
    assert "## Latent diffusion on Fashion-MNIST" in text and "## ChiroDiff on KanjiVG" in text
    assert "| rigl | 50% | sparse | 23.25 | 510 / 1,000 |" in text and "(0.50x)" in text
    assert "| 30 s (2.00x) |" in text  # training time against dense's 61 s
    assert "| dense | 0% | dense | 3.00 | 1,000 / 1,000 |" in text
    assert "sampling time, dense / sparse backend" in text and "| 3.0 s / 1.2 s (2.50x) |" in text
    assert "fid_sparsediff_strokes" in text and "DDPM" in text and "10.0 minutes" in text
    for name in ("dense.png", "rigl-50-sparse.png", "kanjivg-dense.png", "kanjivg-rigl-50.png"):
        assert (out / "grids" / name).is_file() and f"grids/{name}" in text
    assert "### While it trained: rigl 50%" in text and "(DDIM, 25 steps)" in text
    assert "| step 500 | step 1000 |" in text and "4.9% of the 30 s of training" in text
    for step in (500, 1000):
        name = f"during-rigl-50-sparse-{step}.png"
        assert (out / "grids" / name).is_file() and f"![step {step}](grids/{name})" in text
    assert text.count("### While it trained") == 1  # the stroke runs drew none here


def test_engine_demo_trains_dense_and_rigl():
    results = engine_demo(steps=200, sparsity=0.9, quiet=True)
    assert set(results) == {"dense", "rigl"}
    rigl = results["rigl"]
    assert abs(rigl["report"].density - 0.1) < 0.01 and rigl["updates"] >= 1
    assert rigl["flops_sparse"] < 0.2 * results["dense"]["flops_sparse"]
    assert all(r["test_mse"] < 1.0 for r in results.values())
