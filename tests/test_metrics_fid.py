"""FID through torch-fidelity: offline sparsediff feature networks and the Inception path.

Checks against independent references: the Frechet distance recomputed with numpy + scipy.linalg.sqrtm
from features extracted outside torch-fidelity, and orderings on real Fashion-MNIST that any sound
feature space must respect.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import textwrap

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from helpers import PYTHON, python_env
from sparsediff.errors import ConfigError, DataError, StateError
from sparsediff.metrics import features as feat
from sparsediff.metrics import fid as fidmod
from sparsediff.metrics.features import FeatureNet, load_feature_net, train_feature_net
from sparsediff.metrics.fid import FEATURE_EXTRACTORS, compute_fid, metric_name

N = 500  # images per set: enough for stable orderings, a second of FeatureNet time per set


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fmnist() -> dict[str, torch.Tensor]:
    from sparsediff.data import load_fashion_mnist

    try:
        x_tr, _ = load_fashion_mnist("train")
        x_te, y_te = load_fashion_mnist("test")
    except DataError as e:
        pytest.skip(f"bundled Fashion-MNIST unavailable: {e}")
    train = x_tr[:N].unsqueeze(1)  # (N, 1, 28, 28)
    g = torch.Generator().manual_seed(0)
    # Translate by 5 pixels with zero fill (objects stay visible, their position distribution changes).
    shifted = torch.zeros_like(train)
    shifted[..., 5:, 5:] = train[..., :-5, :-5]
    blur_k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
    blur_k = (blur_k[:, None] * blur_k[None, :] / 256).view(1, 1, 5, 5)
    blurred = F.conv2d(train.float(), blur_k, padding=2).round().clamp(0, 255).to(torch.uint8)
    return {
        "train": train,
        "test": x_te[:N].unsqueeze(1),
        "test_labels": y_te[:N],
        "noise": torch.randint(0, 256, train.shape, generator=g, dtype=torch.uint8),
        "shifted": shifted,
        "blurred": blurred,
    }


@pytest.fixture(scope="module")
def fids(fmnist) -> dict[str, float]:
    ref = fmnist["train"]
    return {k: compute_fid(fmnist[k], ref)["value"] for k in ("train", "test", "noise", "shifted", "blurred")}


# ----------------------------------------------------------------------------------------------------
# Names and registry
# ----------------------------------------------------------------------------------------------------


def test_metric_names_cannot_be_mistaken_for_inception():
    assert metric_name("inception-v3-compat") == "fid_inception_v3"
    assert metric_name("sparsediff-fmnist") == "fid_sparsediff_fmnist"
    assert metric_name("sparsediff-strokes") == "fid_sparsediff_strokes"
    for name in FEATURE_EXTRACTORS:
        assert ("inception" in metric_name(name)) == (name == "inception-v3-compat")
    with pytest.raises(ConfigError, match="unknown FID feature extractor"):
        metric_name("inception")


def test_registration_is_idempotent_and_works_in_a_fresh_process():
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    fidmod.register_extractors()
    fidmod.register_extractors()
    assert FEATURE_EXTRACTORS_REGISTRY["sparsediff-fmnist"] is fidmod.SparsediffFeatureExtractor
    # A fresh interpreter: importing the module registers; torch-fidelity itself can then use the name,
    # a second registration and a module reload must not fail, and nothing is printed by default.
    code = textwrap.dedent(
        """
        import importlib, json, torch, torch_fidelity
        import sparsediff.metrics.fid as m
        from sparsediff.data import load_fashion_mnist
        x = load_fashion_mnist("test")[0][:64].unsqueeze(1)
        a = torch_fidelity.calculate_metrics(
            input1=m.FidInputDataset(x[:32]), input2=m.FidInputDataset(x[32:]), fid=True,
            feature_extractor="sparsediff-fmnist", cuda=False, verbose=False, save_cpu_ram=True, cache=False,
        )[torch_fidelity.KEY_METRIC_FID]
        m.register_extractors()
        m = importlib.reload(m)
        b = m.compute_fid(x[:32], x[32:])["value"]
        print(json.dumps({"a": a, "b": b}))
        """
    )
    r = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, env=python_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["a"] == pytest.approx(out["b"], rel=1e-6) and out["a"] > 0
    assert "Frechet" not in r.stderr and "Extracting" not in r.stderr


def test_quiet_unless_verbose(fmnist, capfd):
    x = fmnist["test"][:40]
    compute_fid(x[:20], x[20:])
    captured = capfd.readouterr()
    assert "Frechet" not in captured.err + captured.out
    compute_fid(x[:20], x[20:], verbose=True)
    assert "Frechet Inception Distance" in capfd.readouterr().err


# ----------------------------------------------------------------------------------------------------
# Values on real data
# ----------------------------------------------------------------------------------------------------


def test_result_fields(fmnist):
    r = compute_fid(fmnist["test"][:50], fmnist["train"][:60])
    assert r["metric"] == "fid_sparsediff_fmnist" and r["extractor"] == "sparsediff-fmnist"
    assert (r["num_generated"], r["num_reference"]) == (50, 60)
    assert r["weights"] == "features-fmnist.safetensors"
    assert r["weights_sha256"] == feat.sha256_file(feat.asset_path("fmnist"))
    assert isinstance(r["value"], float) and r["value"] > 0


def test_self_fid_is_zero(fids):
    assert abs(fids["train"]) < 1e-3 * fids["noise"]


def test_orderings_on_fashion_mnist(fids):
    # Held-out real images are far closer than noise, and closer than degraded copies of the reference.
    assert fids["test"] < 0.05 * fids["noise"]
    assert fids["test"] < 0.5 * fids["shifted"]
    assert fids["test"] < 0.5 * fids["blurred"]
    assert fids["blurred"] < fids["noise"] and fids["shifted"] < fids["noise"]


def test_channel_count_and_size_invariance(fmnist):
    gen, ref = fmnist["test"][:200], fmnist["train"][:200]
    one = compute_fid(gen, ref)["value"]
    three = compute_fid(gen.repeat(1, 3, 1, 1), ref.repeat(1, 3, 1, 1))["value"]
    mixed = compute_fid(gen.repeat(1, 3, 1, 1), ref)["value"]
    assert three == pytest.approx(one, rel=1e-6, abs=1e-9)
    assert mixed == pytest.approx(one, rel=1e-6, abs=1e-9)
    # 28x28 is zero-padded to 32x32, so explicitly padded images give the same value.
    padded = compute_fid(F.pad(gen, (2, 2, 2, 2)), ref)["value"]
    assert padded == pytest.approx(one, rel=1e-6, abs=1e-9)


def _frechet(f1: np.ndarray, f2: np.ndarray) -> float:
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_matches_independent_frechet_distance(fmnist):
    gen, ref = fmnist["test"], fmnist["blurred"]
    net = load_feature_net("fmnist")
    with torch.no_grad():
        # Our own preprocessing (pad 28 -> 32, scale to [-1, 1]), independent of features.preprocess.
        f = [net.features(F.pad(x.float(), (2, 2, 2, 2)) / 127.5 - 1).double().numpy() for x in (gen, ref)]
    expected = _frechet(*f)
    got = compute_fid(gen, ref, batch_size=128)["value"]
    assert got == pytest.approx(expected, rel=1e-3)


def test_cache_dir_reuses_reference_statistics(fmnist, tmp_path):
    gen, ref = fmnist["test"][:100], fmnist["train"][:100]
    plain = compute_fid(gen, ref)["value"]
    first = compute_fid(gen, ref, cache_dir=tmp_path)["value"]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files and all("sparsediff-v1-ref" in f for f in files)
    second = compute_fid(gen, ref, cache_dir=tmp_path)["value"]
    assert first == pytest.approx(plain, rel=1e-9) and second == pytest.approx(plain, rel=1e-9)
    compute_fid(gen, ref[:50], cache_dir=tmp_path)  # other reference content -> other cache entry
    assert len(list(tmp_path.iterdir())) == 2 * len(files)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(fmnist):
    gen, ref = fmnist["test"][:200], fmnist["train"][:200]
    cpu = compute_fid(gen, ref)["value"]
    assert compute_fid(gen, ref, device="cuda")["value"] == pytest.approx(cpu, rel=1e-3)


def test_bad_inputs(fmnist):
    x = fmnist["test"][:10]
    with pytest.raises(DataError, match="uint8"):
        compute_fid(x.float() / 255, x)
    with pytest.raises(DataError, match=r"\(N, C, H, W\)"):
        compute_fid(x[:, 0], x)
    with pytest.raises(DataError, match="C in"):
        compute_fid(x.repeat(1, 2, 1, 1), x)
    with pytest.raises(DataError, match="at least 2"):
        compute_fid(x[:1], x)
    with pytest.raises(ConfigError, match="unknown FID feature extractor"):
        compute_fid(x, x, extractor="inception")
    with pytest.raises(ConfigError, match="device"):
        compute_fid(x, x, device="mps")


# ----------------------------------------------------------------------------------------------------
# Feature networks: shipped asset, missing asset, training
# ----------------------------------------------------------------------------------------------------


def test_shipped_fmnist_asset_classifies_real_images(fmnist):
    net = load_feature_net("fmnist")
    assert isinstance(net, FeatureNet) and not net.training
    x, y = fmnist["test"][:200], fmnist["test_labels"][:200]
    acc = feat.evaluate_accuracy(net, x, y)
    assert acc > 0.8
    with torch.no_grad():
        assert net.features(feat.preprocess(x[:4])).shape == (4, 128)
    meta = json.loads(feat.asset_path("fmnist").with_suffix(".json").read_text())
    assert meta["kind"] == "fmnist" and meta["feature_dim"] == 128 and meta["input_size"] == [1, 32, 32]
    assert meta["test_accuracy"] > 0.85 and meta["command"] == "sparsediff train-features fmnist"
    assert feat.asset_path("fmnist").stat().st_size < 1_000_000


def test_missing_or_corrupt_asset_names_the_command(tmp_path, monkeypatch, fmnist):
    shipped = feat.ASSETS_DIR
    monkeypatch.setattr(feat, "ASSETS_DIR", tmp_path)
    with pytest.raises(DataError, match=r"sparsediff train-features fmnist"):
        load_feature_net("fmnist")
    with pytest.raises(DataError, match=r"sparsediff train-features fmnist"):
        compute_fid(fmnist["test"][:10], fmnist["test"][10:20])
    with pytest.raises(DataError, match=r"strokes --data"):
        load_feature_net("strokes")
    # A copy whose bytes no longer match the SHA-256 in its JSON is refused, with the same advice.
    data = (shipped / "features-fmnist.safetensors").read_bytes()
    (tmp_path / "features-fmnist.safetensors").write_bytes(data[:-4] + b"\0\0\0\0")
    (tmp_path / "features-fmnist.json").write_bytes((shipped / "features-fmnist.json").read_bytes())
    with pytest.raises(DataError, match="SHA-256.*sparsediff train-features"):
        load_feature_net("fmnist")
    # Without its JSON, a truncated file fails in the safetensors reader: still a DataError with advice.
    (tmp_path / "features-fmnist.json").unlink()
    (tmp_path / "features-fmnist.safetensors").write_bytes(data[:1000])
    with pytest.raises(DataError, match="cannot read.*sparsediff train-features"):
        load_feature_net("fmnist")
    with pytest.raises(ConfigError, match="unknown feature network kind"):
        load_feature_net("kanji")


def _toy_strokes(n: int = 400) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes of 32x32 'drawings': a horizontal or a vertical bar at a random position."""
    g = torch.Generator().manual_seed(1)
    x = torch.zeros(n, 32, 32, dtype=torch.uint8)
    y = torch.arange(n) % 2
    pos = torch.randint(4, 24, (n,), generator=g)
    for i in range(n):
        p = int(pos[i])
        if y[i] == 0:
            x[i, p : p + 3, 4:28] = 255
        else:
            x[i, 4:28, p : p + 3] = 255
    return x, y


def test_train_strokes_net_and_use_it_for_fid(tmp_path):
    with pytest.raises(DataError, match="dataset"):
        train_feature_net("strokes", out=tmp_path / "x.safetensors")
    out = tmp_path / "features-strokes.safetensors"
    x, y = _toy_strokes()
    meta = train_feature_net("strokes", out=out, epochs=2, dataset=(x, y), progress=False, batch_size=32)
    assert meta["test_accuracy"] > 0.9 and meta["num_classes"] == 2 and meta["test_samples"] == 40
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["sha256"] == feat.sha256_file(out) and "--data" in saved["command"]
    # Same seed, bit-identical weights (not file bytes: safetensors writes its metadata map in any order).
    out2 = tmp_path / "again.safetensors"
    train_feature_net("strokes", out=out2, epochs=2, dataset=(x, y), progress=False, batch_size=32)
    net = load_feature_net("strokes", out)
    again = load_feature_net("strokes", out2).state_dict()
    assert all(torch.equal(v, again[k]) for k, v in net.state_dict().items())
    assert net.config.num_classes == 2
    horiz, vert = x[y == 0].unsqueeze(1), x[y == 1].unsqueeze(1)
    r_same = compute_fid(horiz[:100], horiz[100:], extractor="sparsediff-strokes", weights_path=out)
    r_diff = compute_fid(vert[:100], horiz[100:], extractor="sparsediff-strokes", weights_path=out)
    assert r_same["metric"] == "fid_sparsediff_strokes" and r_same["weights"] == str(out)
    assert r_same["value"] < 0.1 * r_diff["value"]


def test_stroke_feature_data_from_kanjivg_and_shipped_asset():
    assert [feat.stroke_count_class(n) for n in (1, 2, 19, 20, 31)] == [0, 1, 18, 19, 19]
    with pytest.raises(DataError, match="at least one stroke"):
        feat.stroke_count_class(0)
    images, labels, groups = feat.make_stroke_feature_data(copies=3, limit=12, progress=False)
    assert images.dtype == torch.uint8 and images.shape == (36, 32, 32)
    assert labels.shape == groups.shape == (36,)
    # Each character gives `copies` rasters with one label; the copies differ (augmentation).
    assert torch.equal(groups, torch.arange(12).repeat_interleave(3))
    assert all(labels[3 * i : 3 * i + 3].unique().numel() == 1 for i in range(12))
    assert not torch.equal(images[0], images[1]) and images.float().mean() > 1.0
    again, _, _ = feat.make_stroke_feature_data(copies=3, limit=12, progress=False)
    assert torch.equal(images, again)  # seeded
    meta = json.loads(feat.asset_path("strokes").with_suffix(".json").read_text())
    assert meta["kind"] == "strokes" and meta["num_classes"] == feat.STROKE_CLASSES
    assert meta["sha256"] == feat.sha256_file(feat.asset_path("strokes"))
    # 20-way stroke counting on held-out characters: well above chance (uniform chance is 5 %).
    assert meta["test_accuracy"] > 0.3
    assert load_feature_net("strokes").config.num_classes == feat.STROKE_CLASSES


# ----------------------------------------------------------------------------------------------------
# Inception path
# ----------------------------------------------------------------------------------------------------


def test_inception_needs_a_valid_weights_file(fmnist, tmp_path):
    x = fmnist["test"][:4]
    with pytest.raises(ConfigError, match="pt_inception-2015-12-05-6726825d.pth"):
        compute_fid(x, x, extractor="inception-v3-compat")
    with pytest.raises(DataError, match="not found"):
        compute_fid(x, x, extractor="inception-v3-compat", weights_path=tmp_path / "nope.pth")
    # A pickle of arbitrary objects is refused before torch-fidelity would unpickle it.
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"fc.weight": object()}, protocol=2))
    with pytest.raises(DataError, match="weights_only"):
        compute_fid(x, x, extractor="inception-v3-compat", weights_path=evil)
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(10, 128)}, wrong)
    with pytest.raises(StateError, match="Inception-v3"):
        compute_fid(x, x, extractor="inception-v3-compat", weights_path=wrong)


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory) -> str:
    """A state dict of torch-fidelity's own Inception architecture with random weights.

    torch-fidelity's constructor always loads weights; patch the loading away to get the bare
    architecture, then save its (random) state dict as a plain .pth, the format
    ``feature_extractor_weights_path`` reads (``torch.load`` -> ``load_state_dict``).
    """
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    mp = pytest.MonkeyPatch()
    mp.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
    mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
    torch.manual_seed(0)
    try:
        model = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        mp.undo()
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(model.state_dict(), path)
    return str(path)


@pytest.mark.slow
def test_inception_end_to_end_with_a_local_weights_file(fmnist, random_inception_weights):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    gen, ref = fmnist["test"][:4], fmnist["train"][:5]  # grayscale: repeated to RGB for Inception
    r = compute_fid(gen, ref, extractor="inception-v3-compat", weights_path=random_inception_weights)
    assert r["metric"] == "fid_inception_v3" and r["weights"] == random_inception_weights
    assert (r["num_generated"], r["num_reference"]) == (4, 5)
    # The same distance from Inception features extracted outside compute_fid: proves the given file
    # was used and the grayscale images reached the network as 3 equal channels.
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], random_inception_weights)
    with torch.no_grad():
        f = [net(x.repeat(1, 3, 1, 1))[0].double().numpy() for x in (gen, ref)]
    mu1, mu2 = f[0].mean(0), f[1].mean(0)
    s1, s2 = np.cov(f[0], rowvar=False), np.cov(f[1], rowvar=False)
    # 4-5 samples in 2048-d: rank-deficient covariances, so take the trace of the square root from the
    # eigenvalues of s1 s2 (sqrtm of a singular product is ill-conditioned).
    tr = np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)).sum()
    expected = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr)
    assert np.isfinite(r["value"]) and expected > 0
    assert r["value"] == pytest.approx(expected, rel=1e-3)
