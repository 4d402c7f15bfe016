"""Image datasets: folder scanning, seeded splits, preprocessing, Imagenette layout, Fashion-MNIST."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sparsediff.config import DataSpec
from sparsediff.data import (
    ImageFolderDataset,
    ImageTensorDataset,
    build_image_dataset,
    fashion_mnist_dataset,
    load_fashion_mnist,
    reference_images_uint8,
    scan_images,
)
from sparsediff.errors import ConfigError, DataError

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(
    not (FMNIST_DIR / "train-images-idx3-ubyte.gz").exists(), reason="dataset-fashion-mnist not installed"
)


# ---------------------------------------------------------------------------- tiny image folders


def _noise(seed: int, w: int, h: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def _jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_folder(root: Path, n_good: int, corrupt: bool = True) -> dict[str, list[Path]]:
    """``n_good`` readable images of mixed formats/sizes (some in a sub-folder), plus bad files."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "sub").mkdir(exist_ok=True)
    good = []
    for i in range(n_good):
        folder = root / "sub" if i % 3 == 0 else root
        ext = [".png", ".jpg", ".PNG", ".bmp", ".webp"][i % 5]
        path = folder / f"img{i:03d}{ext}"
        _noise(i, 12 + i % 7, 10 + i % 5, "RGB" if i % 4 else "L").save(path)
        good.append(path)
    bad = []
    if corrupt:
        data = _jpeg_bytes(_noise(999, 40, 40))
        (root / "truncated.jpg").write_bytes(data[: len(data) // 2])  # header fine, stream cut
        (root / "sub" / "garbage.jpeg").write_bytes(b"\xff\xd8\xff this is not a jpeg")
        (root / "not_really.png").write_text("just some text with a .png name\n")
        bad = [root / "truncated.jpg", root / "sub" / "garbage.jpeg", root / "not_really.png"]
    (root / "notes.txt").write_text("ignored: not an image extension\n")
    return {"good": good, "bad": bad}


def folder_spec(root: Path, **kw) -> DataSpec:
    kw.setdefault("image_size", 8)
    kw.setdefault("channels", 3)
    return DataSpec(name=kw.pop("name", "image-folder"), root=str(root), **kw)


# ---------------------------------------------------------------------------- scan_images


def test_scan_skips_and_counts_bad_files(tmp_path):
    made = make_folder(tmp_path / "imgs", n_good=7)
    res = scan_images(tmp_path / "imgs", progress=False)
    assert sorted(res.files) == sorted(made["good"])
    assert res.files == sorted(res.files, key=lambda p: p.relative_to(tmp_path / "imgs").as_posix())
    assert sorted(p for p, _ in res.skipped) == sorted(made["bad"])
    reasons = dict(res.skipped)
    assert "truncated" in reasons[tmp_path / "imgs" / "truncated.jpg"]
    assert all(r for r in reasons.values())
    # the .txt file is not a candidate at all
    assert not any(p.suffix == ".txt" for p in res.files + [p for p, _ in res.skipped])


def test_scan_without_verify_and_non_recursive(tmp_path):
    made = make_folder(tmp_path / "imgs", n_good=7)
    res = scan_images(tmp_path / "imgs", verify=False, progress=False)
    assert len(res.files) == 7 + 3 and res.skipped == []
    top = scan_images(tmp_path / "imgs", recursive=False, progress=False)
    assert sorted(top.files) == sorted(p for p in made["good"] if p.parent.name != "sub")


def test_scan_missing_or_empty_root(tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        scan_images(tmp_path / "nowhere", progress=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="empty"):
        scan_images(tmp_path / "empty", progress=False)


# ---------------------------------------------------------------------------- ImageFolderDataset


def test_resize_and_centre_crop(tmp_path):
    # 60x20 landscape: red | green | blue thirds. Shorter side 20 -> 10 gives 30x10; the centre crop
    # 10x10 is the green third (a top-left crop would be red).
    arr = np.zeros((20, 60, 3), dtype=np.uint8)
    arr[:, :20, 0] = 255
    arr[:, 20:40, 1] = 255
    arr[:, 40:, 2] = 255
    Image.fromarray(arr).save(tmp_path / "wide.png")
    # 16x48 portrait, solid colour: any resize + crop keeps the colour exactly
    Image.new("RGB", (16, 48), (255, 0, 0)).save(tmp_path / "tall.png")
    ds = ImageFolderDataset([tmp_path / "wide.png", tmp_path / "tall.png"], image_size=10)
    wide, tall = ds[0], ds[1]
    assert wide.shape == tall.shape == (3, 10, 10)
    assert wide.dtype == torch.float32
    assert wide.min() >= -1 and wide.max() <= 1
    centre = wide[:, :, 3:7]  # columns well away from the colour edges
    assert torch.all(centre[1] > 0.9) and torch.all(centre[0] < -0.9) and torch.all(centre[2] < -0.9)
    assert torch.equal(tall, torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1).expand(3, 10, 10))
    assert torch.equal(ds.load_uint8(1)[0], torch.full((10, 10), 255, dtype=torch.uint8))


def test_grayscale_and_rgb_channels(tmp_path):
    Image.new("RGB", (12, 12), (255, 0, 0)).save(tmp_path / "red.png")
    Image.new("L", (12, 12), 200).save(tmp_path / "gray.png")
    files = [tmp_path / "red.png", tmp_path / "gray.png"]
    gray = ImageFolderDataset(files, image_size=6, channels=1)
    rgb = ImageFolderDataset(files, image_size=6, channels=3)
    assert gray[0].shape == (1, 6, 6) and rgb[0].shape == (3, 6, 6)
    # PIL's L = (299 R + 587 G + 114 B) / 1000 -> pure red is 76
    assert torch.all(gray.load_uint8(0) == 76)
    # a grayscale file read as RGB repeats its value in all three channels
    assert torch.all(rgb.load_uint8(1) == 200)
    assert torch.allclose(rgb[1], torch.full((3, 6, 6), 200 / 127.5 - 1))
    with pytest.raises(ConfigError, match="channels"):
        ImageFolderDataset(files, image_size=6, channels=2)


def test_decode_failure_at_load_names_the_file(tmp_path):
    path = tmp_path / "later_broken.png"
    _noise(0, 10, 10).save(path)
    ds = ImageFolderDataset([path], image_size=8)
    assert ds[0].shape == (3, 8, 8)
    path.write_bytes(b"corrupted after the scan")
    with pytest.raises(DataError, match="later_broken.png"):
        ds[0]


# ---------------------------------------------------------------------------- folder splits


def _names(ds) -> list[str]:
    return [p.name for p in ds.files]


def test_folder_split_sizes_disjoint_and_report(tmp_path):
    make_folder(tmp_path / "imgs", n_good=20)
    spec = folder_spec(tmp_path / "imgs", train_size=12, val_size=5, split_seed=3)
    train, val = build_image_dataset(spec, "train"), build_image_dataset(spec, "val")
    assert len(train) == 12 and len(val) == 5
    assert not set(train.files) & set(val.files)
    assert all(p.name.startswith("img") for p in train.files + val.files)  # no bad file was used
    assert train[0].shape == (3, 8, 8)
    rep = train.report
    for key in ("dataset", "split", "root", "found", "skipped", "skipped_files", "used"):
        assert key in rep
    assert rep["dataset"] == "image-folder" and rep["split"] == "train" and rep["used"] == 12
    assert rep["found"] == 23 and val.report["used"] == 5
    assert rep["skipped"] == len(rep["skipped_files"]) <= 3


def test_folder_split_defaults_and_skip_report(tmp_path):
    made = make_folder(tmp_path / "imgs", n_good=20)
    spec = folder_spec(tmp_path / "imgs")  # train_size None, val_size None
    train, val = build_image_dataset(spec, "train"), build_image_dataset(spec, "val")
    assert len(val) == 2 and len(train) == 18  # 10 % of the 20 readable images, the rest for training
    assert set(train.files) | set(val.files) == set(made["good"])
    # every file was checked, so all three bad ones are reported with their reasons
    assert train.report["skipped"] == 3
    assert sorted(p for p, _ in train.report["skipped_files"]) == sorted(str(p) for p in made["bad"])
    only_val = build_image_dataset(folder_spec(tmp_path / "imgs", val_size=5), "train")
    assert len(only_val) == 15


def test_folder_split_is_deterministic_per_seed(tmp_path):
    make_folder(tmp_path / "imgs", n_good=20, corrupt=False)

    def split(seed: int) -> tuple[list[str], list[str]]:
        spec = folder_spec(tmp_path / "imgs", train_size=10, val_size=5, split_seed=seed)
        return _names(build_image_dataset(spec, "train")), _names(build_image_dataset(spec, "val"))

    assert split(0) == split(0)
    assert split(0) != split(1)
    # the training order is shuffled, not the sorted file order
    assert split(0)[0] != sorted(split(0)[0])


def test_folder_split_too_few_images(tmp_path):
    make_folder(tmp_path / "imgs", n_good=6)
    spec = folder_spec(tmp_path / "imgs", name="celebahq", train_size=5, val_size=3)
    with pytest.raises(DataError, match=r"6 readable images.*train_size=5.*val_size=3"):
        build_image_dataset(spec, "train")


def test_missing_root_errors(tmp_path):
    with pytest.raises(DataError, match=r"CelebA-HQ.*data\.root"):
        build_image_dataset(DataSpec(name="celebahq", image_size=8, channels=3), "train")
    with pytest.raises(DataError, match="--set data.root=PATH"):
        build_image_dataset(DataSpec(name="lsun-bedrooms", image_size=8, channels=3), "val")
    with pytest.raises(DataError, match="does_not_exist"):
        build_image_dataset(folder_spec(tmp_path / "does_not_exist"), "train")


def test_unknown_name_and_split(tmp_path):
    with pytest.raises(ConfigError, match=r"known: .*fashion-mnist.*celebahq.*imagenette"):
        build_image_dataset(DataSpec(name="cifar-11"), "train")
    with pytest.raises(ConfigError, match="split"):
        build_image_dataset(folder_spec(tmp_path), "test")


# ---------------------------------------------------------------------------- Imagenette


def make_imagenette(root: Path, counts: dict[str, dict[str, int]]) -> None:
    seed = 0
    for split, per_class in counts.items():
        for cls, n in per_class.items():
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                seed += 1
                (root / split / cls / f"{cls}_{i}.JPEG").write_bytes(_jpeg_bytes(_noise(seed, 20, 14)))


def test_imagenette_layout(tmp_path):
    counts = {
        "train": {"n01440764": 5, "n02102040": 4, "n03000684": 3},
        "val": {"n01440764": 2, "n02102040": 2, "n03000684": 1},
    }
    make_imagenette(tmp_path / "imagenette2-320", counts)
    spec = folder_spec(tmp_path / "imagenette2-320", name="imagenette")
    train, val = build_image_dataset(spec, "train"), build_image_dataset(spec, "val")
    assert len(train) == 12 and len(val) == 5
    assert all(p.parent.parent.name == "train" for p in train.files)
    assert all(p.parent.parent.name == "val" for p in val.files)
    assert train.report["classes"] == 3 and train[0].shape == (3, 8, 8)
    sub = folder_spec(tmp_path / "imagenette2-320", name="imagenette", train_size=4, val_size=3)
    sub_train = build_image_dataset(sub, "train")
    assert len(sub_train) == 4 and len(build_image_dataset(sub, "val")) == 3
    assert set(sub_train.files) <= set(train.files)
    assert _names(sub_train) == _names(build_image_dataset(sub, "train"))
    with pytest.raises(DataError, match=r"5 readable images.*val_size asks for 6"):
        build_image_dataset(folder_spec(tmp_path / "imagenette2-320", name="imagenette", val_size=6), "val")


def test_imagenette_missing_split_folder(tmp_path):
    make_imagenette(tmp_path / "inette", {"train": {"n01440764": 2}})
    spec = folder_spec(tmp_path / "inette", name="imagenette")
    assert len(build_image_dataset(spec, "train")) == 2
    with pytest.raises(DataError, match=r"val does not exist"):
        build_image_dataset(spec, "val")


# ---------------------------------------------------------------------------- reference images


def test_reference_images_from_folder(tmp_path):
    make_folder(tmp_path / "imgs", n_good=10, corrupt=False)
    spec = folder_spec(tmp_path / "imgs", image_size=6, channels=3, train_size=6, val_size=4)
    ref = reference_images_uint8(spec, "val")
    assert ref.shape == (4, 3, 6, 6) and ref.dtype == torch.uint8
    first2 = reference_images_uint8(spec, "val", n=2)
    assert torch.equal(first2, ref[:2])
    val = build_image_dataset(spec, "val")
    assert torch.allclose(val[1], ref[1].float() / 127.5 - 1)
    with pytest.raises(DataError, match="5 reference images"):
        reference_images_uint8(spec, "val", n=5)


def test_image_tensor_dataset():
    imgs = torch.tensor([0, 255, 128], dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 2, 4, 4).contiguous()
    ds = ImageTensorDataset(imgs, torch.arange(3))
    assert len(ds) == 3 and ds[0].shape == (2, 4, 4)
    assert torch.all(ds[0] == -1) and torch.all(ds[1] == 1)
    assert ds.report["used"] == 3
    with pytest.raises(DataError, match="uint8"):
        ImageTensorDataset(imgs.float())
    with pytest.raises(DataError, match="labels"):
        ImageTensorDataset(imgs, torch.arange(2))


# ---------------------------------------------------------------------------- Fashion-MNIST


@pytest.fixture(scope="module")
def fmnist_raw() -> tuple[torch.Tensor, torch.Tensor]:
    return load_fashion_mnist("train")


@needs_fmnist
def test_fashion_mnist_full_splits_and_padding(fmnist_raw):
    raw, labels = fmnist_raw
    train = fashion_mnist_dataset("train", image_size=32)
    assert train.images.shape == (60000, 1, 32, 32) and train.images.dtype == torch.uint8
    # padding keeps the 28x28 centre identical to the raw pixels and the 2-pixel border black
    assert torch.equal(train.images[:, 0, 2:30, 2:30], raw)
    border = train.images.clone()
    border[:, :, 2:30, 2:30] = 0
    assert border.max() == 0
    assert torch.equal(train.labels, labels)
    x = train[123]
    assert x.shape == (1, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert x.min() == -1 and x.max() == 1  # the full range is used: black background, saturated pixels
    val = fashion_mnist_dataset("val", image_size=32)
    assert val.images.shape == (10000, 1, 32, 32)
    assert torch.equal(val.images, fashion_mnist_dataset("test", image_size=32).images)
    assert train.report["split"] == "train" and train.report["used"] == 60000


@needs_fmnist
def test_fashion_mnist_seeded_subset_and_resize():
    raw, labels = load_fashion_mnist("test")  # the val split: 10k images, quicker than train
    a = fashion_mnist_dataset("val", image_size=28, size=50, seed=0)
    b = fashion_mnist_dataset("val", image_size=28, size=50, seed=0)
    c = fashion_mnist_dataset("val", image_size=28, size=50, seed=1)
    assert a.images.shape == (50, 1, 28, 28)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    # every subset image is a raw image, with its own label
    label_of = {img.tobytes(): int(lab) for img, lab in zip(raw.numpy(), labels.numpy())}
    for img, lab in zip(a.images.numpy(), a.labels.numpy()):
        assert label_of[img[0].tobytes()] == int(lab)
    assert a.report["found"] == 10000 and a.report["used"] == 50
    small = fashion_mnist_dataset("val", image_size=16, size=50, seed=0)  # 16 < 28: resized
    assert small.images.shape == (50, 1, 16, 16)
    # antialiased downsampling keeps each image's mean brightness (within rounding and edge effects)
    assert torch.allclose(small.images.float().mean((1, 2, 3)), a.images.float().mean((1, 2, 3)), atol=2.0)
    # 33 - 28 is odd: resized, not padded. Resizing keeps the mean brightness; padding would scale it
    # by (28 / 33)^2 ~ 0.72. The same seed picks the same first images.
    odd = fashion_mnist_dataset("val", image_size=33, size=3, seed=0)
    assert odd.images.shape == (3, 1, 33, 33)
    assert torch.allclose(odd.images.float().mean((1, 2, 3)), a.images[:3].float().mean((1, 2, 3)), atol=2.0)
    with pytest.raises(DataError, match="10000"):
        fashion_mnist_dataset("val", size=10001)


@needs_fmnist
def test_fashion_mnist_spec_and_reference():
    spec = DataSpec(
        name="fashion-mnist", image_size=32, channels=1, train_size=100, val_size=20, split_seed=5
    )
    train, val = build_image_dataset(spec, "train"), build_image_dataset(spec, "val")
    assert len(train) == 100 and len(val) == 20 and train[0].shape == (1, 32, 32)
    assert train.report["split"] == "train" and val.report["split"] == "val"
    ref = reference_images_uint8(spec, "val")
    assert ref.shape == (20, 1, 32, 32) and ref.dtype == torch.uint8
    assert torch.equal(ref, val.images)
    assert torch.equal(reference_images_uint8(spec, "val", n=7), val.images[:7])
    full_val = reference_images_uint8(DataSpec(name="fashion-mnist", image_size=32), "val")
    assert full_val.shape == (10000, 1, 32, 32)
    rgb = build_image_dataset(DataSpec(name="fashion-mnist", channels=3, val_size=4), "val")
    x = rgb[0]
    assert x.shape == (3, 32, 32) and torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
