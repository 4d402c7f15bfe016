"""Sparse on disk: the compressed tensor format, compressed checkpoints, sparse exports, bytes on disk."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load, save, save_file

from helpers import CHECKPOINT_FILES, TINY_LDM, assert_same_checkpoints
from helpers import tiny_ldm as tiny
from sparsediff.checkpoint import (
    ENGINE_FILE,
    CheckpointDir,
    directory_nbytes,
    load_tensors,
    model_tensors,
)
from sparsediff.cli import main as cli
from sparsediff.config import load_config
from sparsediff.errors import StateError
from sparsediff.export import export_sparse, load_export, load_sparse_export, sparse_export_nbytes
from sparsediff.inspection import inspect_preset
from sparsediff.models import build_model
from sparsediff.report import report
from sparsediff.run import RunDir, load_model_and_masks
from sparsediff.sparse.codec import (
    METADATA_KEY,
    PART,
    Support,
    decode,
    encode,
    int_view,
    load_compressed,
    load_with_supports,
    pack_bits,
    save_compressed,
    unpack_bits,
)
from sparsediff.sparse.io import engine_state_from_tensors
from sparsediff.train import train

DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
]


def bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bits (as an integer tensor): equal bits <=> the same tensor, -0.0 and NaN payloads too."""
    return int_view(t.contiguous()) if t.dtype != torch.bool else t


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, density: float, seed: int) -> torch.Tensor:
    """Random bits (NaN payloads, infinities, subnormals included) at ``density``; for floats a third of
    the inactive entries are -0.0."""
    g = torch.Generator().manual_seed(seed)
    n = int(torch.Size(shape).numel())
    if dtype == torch.bool:
        return torch.rand(n, generator=g).lt(density).view(shape)
    size = torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n * size,), dtype=torch.uint8, generator=g)
    iv = int_view(raw.view(dtype) if dtype != torch.uint8 else raw).clone()
    inactive = torch.rand(n, generator=g) >= density
    iv[inactive] = 0
    if dtype.is_floating_point:
        negzero = int(int_view(torch.tensor([-0.0], dtype=dtype))[0])
        iv[inactive & (torch.rand(n, generator=g) < 1 / 3)] = negzero
    return (iv.view(dtype) if iv.dtype != dtype else iv).view(shape)


def through_safetensors(tensors: dict, supports=None, deflate: bool = False) -> tuple[dict, dict, int]:
    """Encode, serialise, read back and decode: ``(tensors, index, file bytes)``."""
    stored, index = encode(tensors, supports, deflate)
    raw = save(stored, metadata={METADATA_KEY: json.dumps(index)})
    return decode(load(raw), index, "memory"), index, len(raw)


# ---------------------------------------------------------------------------- the format


def test_pack_bits_order_and_padding():
    mask = torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 0, 1], dtype=torch.bool)
    packed = pack_bits(mask)
    assert packed.tolist() == [0b10000001, 0b00000010]  # entry 8 j + i in bit i of byte j, padding 0
    assert torch.equal(unpack_bits(packed, 10), mask)


@given(
    dtype=st.sampled_from(DTYPES),
    shape=st.lists(st.integers(1, 24), min_size=1, max_size=3).map(tuple),
    density=st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.01, 0.99)),
    mode=st.sampled_from(["own", "given", "required", "wrong-mask"]),
    deflate=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_round_trip_is_bit_exact_for_every_dtype_and_density(dtype, shape, density, mode, deflate, seed):
    t = random_tensor(shape, dtype, density, seed)
    active = bits(t).reshape(-1) != 0
    if dtype.is_floating_point:  # -0.0 is inactive for a mask
        active &= bits(t).reshape(-1) != int(int_view(torch.tensor([-0.0], dtype=dtype))[0])
    g = torch.Generator().manual_seed(seed + 1)
    extra = torch.rand(active.numel(), generator=g) < 0.2  # a mask with exact zeros inside it
    supports = None
    if mode in ("given", "required"):
        supports = {"t": Support((active | extra).view(shape), required=mode == "required")}
    elif mode == "wrong-mask":  # misses active entries: never used, the tensor gets its own support
        supports = {"t": Support((active & extra).view(shape))}
    out, index, nbytes = through_safetensors({"t": t, "dense": torch.arange(5)}, supports, deflate)
    assert same(out["t"], t) and same(out["dense"], torch.arange(5))
    entry = index["tensors"]["t"]
    if mode == "required":
        assert entry["support"]["given"]
    elif mode == "wrong-mask" and bool((active & ~extra).any()):
        assert "given" not in entry.get("support", {})
    dense_bytes = t.numel() * t.element_size()
    if dense_bytes >= 4096 and density < 0.2 and mode != "required":
        assert nbytes < 0.6 * dense_bytes + 1024  # sparse tensors are stored compressed


def test_forms_chosen_by_size():
    n = 64 * 64
    zeros = torch.zeros(n)
    negzeros = torch.full((n,), -0.0)
    ten = random_tensor((n,), torch.float32, 0.1, 0)
    ten[ten.isnan() | ten.isinf()] = 1.0
    few = torch.zeros(n)
    few[::500] = 1.5
    mask = (torch.arange(n) % 3 == 0).to(torch.uint8)
    dense = torch.randn(n)
    out, index, _ = through_safetensors(
        {"zeros": zeros, "negzeros": negzeros, "ten": ten, "few": few, "mask": mask, "dense": dense}
    )
    e = index["tensors"]
    assert e["zeros"]["nnz"] == 0 and e["zeros"]["support"]["kind"] == "indices"
    assert e["negzeros"]["negzero"]["count"] == n
    assert e["ten"]["support"]["kind"] == "deflated"  # 10 %: the deflated bitmask beats the raw one
    assert e["few"]["support"]["kind"] == "indices" and e["few"]["values"]["kind"] == "fill"
    assert e["mask"]["values"] == {"kind": "fill", "bits": 1}  # a 0/1 mask: its bitmask only
    assert "shape" not in e["dense"]  # stored as it is
    for k, v in {"zeros": zeros, "negzeros": negzeros, "ten": ten, "few": few, "mask": mask}.items():
        assert same(out[k], v), k


def test_deflated_exponents_are_smaller_and_exact():
    w = torch.randn(4096) * 0.05
    w[torch.rand(4096, generator=torch.Generator().manual_seed(0)) > 0.3] = 0.0
    plain, _, n_plain = through_safetensors({"w": w})
    packed, index, n_packed = through_safetensors({"w": w}, deflate=True)
    assert index["tensors"]["w"]["values"]["kind"] == "planes"
    assert n_packed < 0.95 * n_plain and same(packed["w"], w) and same(plain["w"], w)


def test_masks_shared_between_files(tmp_path):
    torch.manual_seed(0)
    mask = torch.rand(32, 32) < 0.2
    w = torch.randn(32, 32) * mask  # -0.0 wherever a negative weight was masked
    w[mask.nonzero()[0].tolist()] = 0.0  # an exact zero inside the mask
    save_compressed(tmp_path / "engine.safetensors", {"mask/w": mask.to(torch.uint8)})
    shared = {
        "w": Support(mask, "mask/w", "engine.safetensors"),
        "m": Support(mask, "mask/w", "engine.safetensors"),
    }
    save_compressed(tmp_path / "model.safetensors", {"w": w, "m": w * 2}, {"k": "v"}, shared)
    tensors, supports, meta = load_with_supports(tmp_path / "model.safetensors")
    assert same(tensors["w"], w) and same(tensors["m"], w * 2) and meta == {"k": "v"}
    assert torch.equal(supports["w"], mask)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()[METADATA_KEY])["tensors"]["w"]["support"]["kind"] == "shared"

    # the mask file of another model: refused, naming both files and the tensor
    other = torch.rand(32, 32) < 0.2
    save_compressed(tmp_path / "engine.safetensors", {"mask/w": other.to(torch.uint8)})
    with pytest.raises(StateError, match=r"model.safetensors: tensor 'w'.*engine.safetensors.*different"):
        load_compressed(tmp_path / "model.safetensors")
    (tmp_path / "engine.safetensors").unlink()
    with pytest.raises(StateError, match="keeps its masks in engine.safetensors, which is missing"):
        load_compressed(tmp_path / "model.safetensors")


def test_plain_safetensors_files_load_as_they_are(tmp_path):
    t = {"a": torch.randn(3, 4), "b": torch.zeros(100, dtype=torch.int64)}
    save_file(t, str(tmp_path / "plain.safetensors"), metadata={"x": "y"})
    out, meta = load_compressed(tmp_path / "plain.safetensors")
    assert meta == {"x": "y"} and all(same(out[k], t[k]) for k in t)


# ---------------------------------------------------------------------------- bad files


def _sparse_file(path: Path) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    tensors = {
        "layer.weight": torch.randn(64, 64) * (torch.rand(64, 64) < 0.1),
        "layer.bias": torch.randn(64),
    }
    save_compressed(path, tensors)
    return tensors


def _header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8 : 8 + n])


def test_truncated_file_names_the_file_and_the_tensor(tmp_path):
    path = tmp_path / "w.safetensors"
    _sparse_file(path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(StateError, match=rf"{path} is truncated: tensor 'layer.weight#sparse'"):
        load_compressed(path)
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(StateError, match=rf"{path} is truncated"):
        load_compressed(path)


def test_corrupted_bytes_are_caught_by_the_checksum(tmp_path):
    path = tmp_path / "w.safetensors"
    _sparse_file(path)
    n, header = _header(path)
    start, end = header["layer.weight#sparse"]["data_offsets"]
    raw = bytearray(path.read_bytes())
    raw[8 + n + (start + end) // 2] ^= 0x10  # one bit flipped in the middle of the part
    path.write_bytes(bytes(raw))
    with pytest.raises(StateError, match=rf"{path}: tensor 'layer.weight': checksum mismatch"):
        load_compressed(path)


def _edited(path: Path, edit) -> None:
    """Rewrite ``path`` with ``edit(stored, index)`` applied (checksums recomputed: only a wrong count
    or mask is left to find)."""
    from sparsediff.sparse.codec import crc32_of

    with safe_open(str(path), "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        index = json.loads(f.metadata()[METADATA_KEY])
    edit(stored, index)
    for name, e in index["tensors"].items():
        if "shape" in e:
            e["crc"] = crc32_of(stored[name + PART])
    save_file(stored, str(path), metadata={METADATA_KEY: json.dumps(index)})


def test_a_mask_whose_count_disagrees_with_the_values(tmp_path):
    path = tmp_path / "w.safetensors"
    _sparse_file(path)

    def fewer_values(stored, index):
        e = index["tensors"]["layer.weight"]
        assert e["values"]["kind"] == "raw"
        stored["layer.weight" + PART] = stored["layer.weight" + PART][:-4]  # one float32 value less
        e["values"]["bytes"] -= 4

    _edited(path, fewer_values)
    with pytest.raises(
        StateError, match=r"tensor 'layer.weight': .* values stored for a mask of \d+ .*count mismatch"
    ):
        load_compressed(path)

    _sparse_file(path)

    def wrong_count(stored, index):
        index["tensors"]["layer.weight"]["nnz"] += 1

    _edited(path, wrong_count)
    with pytest.raises(
        StateError, match=r"tensor 'layer.weight': its mask has \d+ active entries but the index says"
    ):
        load_compressed(path)


def test_corrupted_index_is_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    tensors = _sparse_file(path)
    stored, index = encode(tensors)
    save_file(stored, str(path), metadata={METADATA_KEY: json.dumps(index)[:-3]})
    with pytest.raises(StateError, match="compression index is corrupted"):
        load_compressed(path)
    save_file({**stored, "stray": torch.ones(2)}, str(path), metadata={METADATA_KEY: json.dumps(index)})
    with pytest.raises(StateError, match="tensor 'stray' is not in the file's compression index"):
        load_compressed(path)


# ---------------------------------------------------------------------------- checkpoints


def _decompress_checkpoint(ckpt: Path) -> None:
    """Rewrite a checkpoint's files as plain safetensors, as checkpoints were before compression."""
    for name in ("model", "ema", "optimizer", "engine"):
        tensors, meta = load_tensors(ckpt / f"{name}.safetensors")
        save_file(
            {k: v.contiguous() for k, v in tensors.items()}, str(ckpt / f"{name}.safetensors"), meta or None
        )


@pytest.fixture(scope="module")
def rigl_runs(first_stage, tmp_path_factory):
    """A straight 20-step RigL 90 % run and the same run in two parts (10 steps, then resumed)."""
    root = tmp_path_factory.mktemp("compressed")
    cfg = tiny(first_stage, sparse={"method": "rigl", "sparsity": 0.9, "update_every": 3})
    train(cfg, root / "straight", quiet=True)
    train(cfg, root / "parts", quiet=True, stop_after=10)
    half = CheckpointDir(root / "parts" / "checkpoints").latest()
    shutil.copytree(root / "parts", root / "old")  # the same half run, its checkpoint written uncompressed
    _decompress_checkpoint(root / "old" / "checkpoints" / half.name)
    train(cfg, root / "parts", resume=True, quiet=True)
    return cfg, root


def test_checkpoints_are_compressed_against_the_engine_masks(rigl_runs):
    _, root = rigl_runs
    ckpt = RunDir(root / "straight").latest_checkpoint()
    kinds = {}
    for name in ("model", "ema", "optimizer"):
        with safe_open(str(ckpt / f"{name}.safetensors"), "pt") as f:
            entries = json.loads(f.metadata()[METADATA_KEY])["tensors"]
        kinds[name] = {e["support"]["kind"] for e in entries.values() if "support" in e}
        refs = {e["support"].get("file") for e in entries.values() if "support" in e}
        assert refs <= {ENGINE_FILE}, name
    assert kinds["model"] == kinds["optimizer"] == {"shared"}  # one mask per layer, in engine.safetensors
    masks = engine_state_from_tensors(*load_tensors(ckpt / ENGINE_FILE))["masks"]
    weights = load_tensors(ckpt / "model.safetensors")[0]
    assert all(not bool((weights[n][~m] != 0).any()) for n, m in masks.items())
    plain = sum(
        len(save({k: v.contiguous() for k, v in load_tensors(ckpt / f"{n}.safetensors")[0].items()}))
        for n in CHECKPOINT_FILES
    )
    assert directory_nbytes(ckpt) < 0.35 * plain  # the tiny preset at 90 %: header-heavy, still small


def test_resumed_run_from_a_compressed_checkpoint_equals_the_straight_run_bit_for_bit(rigl_runs):
    _, root = rigl_runs
    summary = RunDir(root / "parts").read_summary()
    assert summary["steps"] == 20 and summary["topology_updates"] >= 3
    assert_same_checkpoints(
        RunDir(root / "straight").latest_checkpoint(), RunDir(root / "parts").latest_checkpoint(), key=bits
    )


def test_old_uncompressed_checkpoints_still_load_and_resume(rigl_runs):
    cfg, root = rigl_runs
    half = RunDir(root / "old").latest_checkpoint()
    with safe_open(str(half / "model.safetensors"), "pt") as f:
        assert METADATA_KEY not in (f.metadata() or {})
    _, model, masks, info = load_model_and_masks(root / "old")
    assert info["checkpoint"] == str(half) and len(masks) > 0
    train(cfg, root / "old", resume=True, quiet=True)
    assert_same_checkpoints(
        RunDir(root / "straight").latest_checkpoint(), RunDir(root / "old").latest_checkpoint(), key=bits
    )


def test_checkpoint_files_from_another_run_are_refused(rigl_runs, tmp_path):
    cfg, root = rigl_runs
    run = tmp_path / "mixed"
    shutil.copytree(root / "straight", run)
    ckpt = RunDir(run).latest_checkpoint()
    ema, ema_meta = load_tensors(ckpt / "ema.safetensors")
    half = CheckpointDir(root / "straight" / "checkpoints").list()[0]  # an earlier step: other masks
    shutil.copy(half / ENGINE_FILE, ckpt / ENGINE_FILE)
    with pytest.raises(
        StateError, match=r"safetensors: tensor '.*': its mask .*engine.safetensors.*different"
    ):
        load_model_and_masks(run, use_ema=False)
    # EMA weights stored on their own (not against the masks): the engine file is still checked
    save_file({k: v.contiguous() for k, v in ema.items()}, str(ckpt / "ema.safetensors"), ema_meta)
    with pytest.raises(
        StateError, match=r"engine.safetensors: the mask of '.*' is not the one model.safetensors"
    ):
        load_model_and_masks(run)

    shutil.copytree(root / "straight", tmp_path / "opt")
    ckpt = RunDir(tmp_path / "opt").latest_checkpoint()
    tensors, meta = load_tensors(ckpt / "optimizer.safetensors")
    meta["param_names"] = json.dumps(list(reversed(json.loads(meta["param_names"]))))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(ckpt / "optimizer.safetensors"), meta)
    longer = tiny(cfg.first_stage.path, sparse={"method": "rigl", "sparsity": 0.9, "update_every": 3})
    longer.train.max_steps = 22
    with pytest.raises(StateError, match="optimizer.safetensors holds the optimiser state of another model"):
        train(longer, tmp_path / "opt", resume=True, quiet=True)


# ---------------------------------------------------------------------------- sparse export


def test_export_sparse_loads_back_into_the_masked_model_and_the_runtime(rigl_runs, tmp_path):
    _, root = rigl_runs
    run = root / "straight"
    path = tmp_path / "model.safetensors"
    assert cli(["export", "--run", str(run), "--format", "sparse", "--out", str(path)]) == 0
    cfg, model, masks = load_sparse_export(path)
    _, ref, ref_masks, _ = load_model_and_masks(run)
    assert all(same(v, ref.state_dict()[k]) for k, v in model.state_dict().items())
    assert masks.keys() == ref_masks.keys() and all(torch.equal(masks[n], ref_masks[n]) for n in masks)
    ckpt = RunDir(run).latest_checkpoint()
    engine_masks = engine_state_from_tensors(*load_tensors(ckpt / ENGINE_FILE))["masks"]
    assert all(torch.equal(masks[n], engine_masks[n]) for n in engine_masks)

    dense = tmp_path / "dense.safetensors"
    assert cli(["export", "--run", str(run), "--format", "masked-dense", "--out", str(dense)]) == 0
    assert path.stat().st_size < 0.35 * dense.stat().st_size
    assert sparse_export_nbytes(run) == path.stat().st_size  # what evaluate records, exactly

    half = export_sparse(run, tmp_path / "half.safetensors", dtype="float16")
    assert half["bytes"] < 0.75 * path.stat().st_size
    _, model16, masks16 = load_sparse_export(half["out"])
    assert all(p.dtype == torch.float16 for p in model16.parameters())
    assert all(torch.equal(v, ref.state_dict()[k].half()) for k, v in model16.state_dict().items())
    assert all(torch.equal(masks16[n], masks[n]) for n in masks)

    _, again, info = load_export(path, device="cpu")  # the generic loader takes it too
    assert info["format"] == "sparsediff.sparse-export/1" and info["masked_layers"] == len(masks)
    from sparsediff.sparse.runtime import to_sparse_inference

    fast = to_sparse_inference(model, masks, max_density=1.0)
    xs = model.example_inputs(2)
    with torch.no_grad():
        torch.testing.assert_close(fast(*xs), model(*xs), rtol=1e-4, atol=1e-5)


def test_bad_sparse_exports_are_refused(rigl_runs, tmp_path):
    _, root = rigl_runs
    path = tmp_path / "model.safetensors"
    export_sparse(root / "straight", path)
    raw = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[:-64])
    with pytest.raises(StateError, match=r"cut.safetensors is truncated: tensor '.*'"):
        load_sparse_export(tmp_path / "cut.safetensors")

    # the config of another model next to these weights
    tensors, masks, meta = load_with_supports(path)
    other = load_config("unet-tiny")  # another denoiser
    supports = {n: Support(m, required=True) for n, m in masks.items()}
    save_compressed(tmp_path / "other.safetensors", tensors, {**meta, "config": other.to_yaml()}, supports)
    with pytest.raises(StateError, match=r"other.safetensors .*does not fit this model"):
        load_sparse_export(tmp_path / "other.safetensors")

    save_file(model_tensors(build_model(other.model)), str(tmp_path / "plain.safetensors"))
    with pytest.raises(StateError, match="is not a sparse export"):
        load_sparse_export(tmp_path / "plain.safetensors")


# ---------------------------------------------------------------------------- bytes on disk


def test_inspect_reports_bytes_on_disk(tmp_path):
    info = inspect_preset("unet-tiny", sparsity=0.9)
    torch.manual_seed(0)
    model = build_model(load_config("unet-tiny").model)
    save_file(model_tensors(model), str(tmp_path / "dense.safetensors"))
    assert info["bytes_dense"] == (tmp_path / "dense.safetensors").stat().st_size
    assert 0.08 * info["bytes_dense"] < info["bytes_sparse"] < 0.16 * info["bytes_dense"]
    zero = inspect_preset("unet-tiny", sparsity=0.0)
    assert zero["bytes_dense"] <= zero["bytes_sparse"] < 1.01 * zero["bytes_dense"]


def test_report_shows_bytes_on_disk(tmp_path):
    base = {"finished": True, "steps": 10, "batch_size": 8, "params_total": 1000, "flops_forward_dense": 400}
    for name, method, ckpt, model in (
        ("d", "dense", 10_000_000, 2_500_000),
        ("r", "rigl", 1_420_000, 310_000),
    ):
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        over = {"sparse": {"method": method, "sparsity": 0.9}}
        (run / "config.yaml").write_text(load_config(TINY_LDM, over).to_yaml())
        (run / "summary.json").write_text(json.dumps({**base, "checkpoint_bytes": ckpt}))
        ev = {
            "fid": {"metric": "fid_x", "value": 10.0},
            "num_samples": 4,
            "num_reference": 4,
            "model_bytes": model,
        }
        (run / "eval.json").write_text(json.dumps(ev))
    text = Path(report([tmp_path / "runs"], tmp_path / "out")["report"]).read_text()
    header = next(x for x in text.splitlines() if x.startswith("| method"))
    assert header.endswith("| checkpoint on disk | model on disk |")
    rigl = next(x for x in text.splitlines() if x.startswith("| rigl"))
    assert rigl.endswith("| 1.42 MB (0.142x) | 310.0 kB (0.124x) |")
    dense = next(x for x in text.splitlines() if x.startswith("| dense"))
    assert dense.endswith("| 10.00 MB | 2.50 MB |")
