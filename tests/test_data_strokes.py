"""Pen-stroke data: KanjiVG on the real package files, the SVG path parser, ChiroDiff preprocessing,
QuickDraw / VMNIST formats on small files written here, Hershey digits, rasterising and SVG export."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch

from sparsediff.config import DataSpec
from sparsediff.data import (
    DataReport,
    SkipReason,
    StrokeDataset,
    build_stroke_dataset,
    collate_strokes,
    from_velocity,
    hershey_digits,
    kanji_strokes,
    load_kanjivg,
    load_quickdraw,
    load_vmnist,
    make_grid,
    parse_path,
    points_to_strokes,
    preprocess,
    random_affine,
    rasterize,
    read_ndjson,
    read_npz,
    read_svg_strokes,
    save_grid,
    split_indices,
    to_points,
    to_svg,
    to_velocity,
    write_ndjson,
    write_npz,
)
from sparsediff.data.kanjivg import PathSyntaxError
from sparsediff.data.quickdraw import category_of, stroke3_to_strokes, strokes_to_stroke3
from sparsediff.errors import ConfigError, DataError

SVG_HEAD = '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 109 109">'


def _same_strokes(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))


# ---------------------------------------------------------------------------- KanjiVG (real files)


@pytest.mark.parametrize("char,n", [("一", 1), ("二", 2), ("木", 4), ("永", 5), ("森", 12)])
def test_kanjivg_stroke_counts(char, n):
    strokes = kanji_strokes(char)
    assert len(strokes) == n
    for s in strokes:
        assert s.ndim == 2 and s.shape[1] == 2 and len(s) > 2
        assert (s >= 0).all() and (s <= 109).all()  # inside the 109 x 109 viewBox


def test_kanjivg_first_stroke_of_ichi_goes_left_to_right():
    (s,) = kanji_strokes("一")
    assert np.allclose(s[0], [11, 54.25])  # "M11,54.25" in 04e00.svg
    assert s[-1, 0] > 90 and abs(s[-1, 1] - 50) < 2  # ends at the right


def test_load_kanjivg_chars_variants_missing():
    items, report = load_kanjivg(chars="一木😀")
    assert [(c, len(s)) for c, s in items] == [("一", 1), ("木", 4)]
    assert report.total == 3 and report.used == 2 and report.skipped == {"missing": 1}
    items, _ = load_kanjivg(chars="木", include_variants=True)  # 06728.svg and 06728-Kaisho.svg
    assert [c for c, _ in items] == ["木", "木"]
    items, report = load_kanjivg(limit=7)
    assert len(items) == 7 and report.total == 7


def test_kanjivg_folder_with_bad_files(tmp_path):
    (tmp_path / "04e00.svg").write_text(
        SVG_HEAD
        + '<g><path d="M10,50 L90,50"/></g><g><text transform="matrix(1 0 0 1 4 5)">1</text></g></svg>'
    )
    (tmp_path / "04e01.svg").write_text(SVG_HEAD + "<g><text>no strokes</text></g></svg>")
    (tmp_path / "04e02.svg").write_text(SVG_HEAD + '<path d="M10,50 L90,50"')  # cut off
    (tmp_path / "04e03.svg").write_text(SVG_HEAD + '<path d="M10,50 Lx"/></svg>')  # bad path data
    (tmp_path / "04e04.svg").write_text(SVG_HEAD + '<g transform="scale(2)"><path d="M0 0 L1 1"/></g></svg>')
    items, report = load_kanjivg(path=tmp_path)
    assert [c for c, _ in items] == ["一"]
    assert np.array_equal(items[0][1][0], [[10, 50], [90, 50]])
    assert report.total == 5 and report.used == 1
    assert report.skipped == {"no_paths": 1, "malformed": 3}
    assert ("04e01.svg", "no_paths") in report.examples
    with pytest.raises(DataError, match="transform"):
        read_svg_strokes(tmp_path / "04e04.svg")
    with pytest.raises(DataError, match="data.args.path"):
        load_kanjivg(path=tmp_path / "nowhere")


# ---------------------------------------------------------------------------- SVG path data


def test_path_lines_relative_absolute_close():
    (p,) = parse_path("M10 20 L30 40 l10 10 H0 v5 h3 V100 Z")
    expected = [[10, 20], [30, 40], [40, 50], [0, 50], [0, 55], [3, 55], [3, 100], [10, 20]]
    assert np.array_equal(p, expected)


def test_path_implicit_repeats_and_compact_numbers():
    (p,) = parse_path("M0 0 10 0 10 10")  # numbers after M are linetos
    assert np.array_equal(p, [[0, 0], [10, 0], [10, 10]])
    (p,) = parse_path("m1 1 2 2 1 0")  # ...relative after m
    assert np.array_equal(p, [[1, 1], [3, 3], [4, 3]])
    (p,) = parse_path("M1.5-2.3e-1.5.5L-1e1,+2E0")
    assert np.allclose(p, [[1.5, -0.23], [0.5, 0.5], [-10, 2]])
    (p,) = parse_path("M0,0L1,1,2,2l1-1-1-1")
    assert np.array_equal(p, [[0, 0], [1, 1], [2, 2], [3, 1], [2, 0]])


def test_path_cubic_points():
    (p,) = parse_path("M0 0 C0 1 1 1 1 0", samples_per_curve=2)
    assert np.allclose(p, [[0, 0], [0.5, 0.75], [1, 0]])  # B(0.5) = (0 + 3*0 + 3*1 + 1)/8, (3 + 3)/8
    (q,) = parse_path("M1 1 c0 1 1 1 1 0", samples_per_curve=2)
    assert np.allclose(q, p + 1)


def test_path_smooth_cubic_reflects_previous_control():
    explicit = parse_path("M0 0 C0 1 1 1 1 0 C1 -1 2 -1 2 0")  # (1,-1) = 2*(1,0) - (1,1)
    assert np.allclose(parse_path("M0 0 C0 1 1 1 1 0 S2 -1 2 0")[0], explicit[0])
    assert np.allclose(parse_path("M0 0 c0 1 1 1 1 0 s1 -1 1 0")[0], explicit[0])
    # S after a non-curve: the first control point is the current point
    assert np.allclose(parse_path("M0 0 L1 0 S2 1 3 0")[0], parse_path("M0 0 L1 0 C1 0 2 1 3 0")[0])
    # implicit repeat of S keeps reflecting
    rep = parse_path("M0 0 C0 1 1 1 1 0 S2 -1 2 0 3 1 3 0")[0]
    two = parse_path("M0 0 C0 1 1 1 1 0 C1 -1 2 -1 2 0 C2 1 3 1 3 0")[0]
    assert np.allclose(rep, two)


def test_path_quadratic_smooth_and_arc():
    (p,) = parse_path("M0 0 Q1 1 2 0 T4 0", samples_per_curve=2)
    assert np.allclose(p, [[0, 0], [1, 0.5], [2, 0], [3, -0.5], [4, 0]])
    (a,) = parse_path("M0 0 A1 1 0 0 1 2 0", samples_per_curve=8)
    assert np.allclose(np.linalg.norm(a - [1, 0], axis=1), 1.0)  # a half circle about (1, 0)
    assert np.allclose(a[4], [1, -1]) and np.allclose(a[-1], [2, 0])  # sweep 1: over the top (y down)
    (b,) = parse_path("M0 0 a1 1 0 012 0", samples_per_curve=8)  # flags written without separators
    assert np.allclose(a, b)
    (e,) = parse_path("M0 0 A2 1 90 0 1 0 4", samples_per_curve=8)  # ellipse rotated by 90 degrees
    assert np.allclose(((e[:, 1] - 2) / 2) ** 2 + e[:, 0] ** 2, 1.0) and np.allclose(e[4], [1, 2])
    (r,) = parse_path("M0 0 A0.5 0.5 0 0 1 4 0", samples_per_curve=8)  # radii too small: scaled up
    assert np.allclose(np.linalg.norm(r - [2, 0], axis=1), 2.0)


def test_path_subpaths_and_errors():
    parts = parse_path("M0 0 L1 0 M5 5 L6 6 z m1 0 l1 0")
    assert [len(s) for s in parts] == [2, 3, 2]
    assert np.array_equal(parts[2], [[6, 5], [7, 5]])  # after z the current point is the subpath start
    assert parse_path("M3 3") == []  # a lone moveto draws nothing
    with pytest.raises(PathSyntaxError, match="'x3' at character 13"):
        parse_path("M10 20 L30 40x3")
    for bad in ["L1 2", "M1", "M1 2 x", "M0 0 C1 1 2 2", "M0 0 Z 1 1", "M1e 2"]:
        with pytest.raises(PathSyntaxError):
            parse_path(bad)


# ---------------------------------------------------------------------------- preprocessing


def test_points_and_pen_bits():
    strokes = [np.array([[0, 0], [1, 0], [2, 0]]), np.array([[5, 5]]), np.array([[3, 3], [4, 4]])]
    p = to_points(strokes)
    assert p.shape == (6, 3)
    assert p[:, 2].tolist() == [0, 0, 1, 1, 0, 1]
    assert np.array_equal(p[:, :2], np.concatenate(strokes))
    back = points_to_strokes(p)
    assert _same_strokes(back, [s.astype(float) for s in strokes])


def test_preprocess_normalises_without_resampling():
    strokes = [np.array([[10.0, 20.0], [13.0, 24.0], [10.0, 30.0]]), np.array([[0.0, 20.0], [5.0, 25.0]])]
    p = preprocess(strokes, resample=None, scale=10.0)
    assert np.array_equal(p[0, :2], [0, 0])  # first point at the origin
    assert np.isclose(np.linalg.norm(p[:, :2], axis=1).max(), 10.0)  # largest distance = scale
    assert np.allclose(p[:, :2], (to_points(strokes)[:, :2] - [10, 20]) / 10.0 * 10.0)
    assert p[:, 2].tolist() == [0, 0, 1, 0, 1]


def test_preprocess_resamples_by_arc_length():
    # stroke 1: (0,0)->(3,0)->(3,4): length 7, max distance 5 -> 1.4 units; stroke 2 a single point
    strokes = [np.array([[0.0, 0.0], [3.0, 0.0], [3.0, 4.0]]), np.array([[1.0, 1.0]])]
    p = preprocess(strokes, resample=0.05, scale=10.0)
    s1 = p[:-1, :2]
    assert np.array_equal(p[:, 2].nonzero()[0], [len(p) - 2, len(p) - 1])
    assert len(s1) == 29  # normalised length 1.4, a point every 0.05 from 0 to 1.4
    arc = np.concatenate([[0], np.cumsum(np.linalg.norm(np.diff(s1, axis=0), axis=1))])
    corner = 3 / 5 * 10  # the corner sits at arc length 6.0 after scaling: a sample point
    assert np.allclose(np.diff(arc), 0.5)  # spacing = resample * scale along the stroke
    assert np.allclose(s1[12], [corner, 0])
    assert np.allclose(s1[-1], [6, 8])  # end point kept
    assert np.allclose(p[-1, :2], [2, 2])  # the single point stays one point


def test_preprocess_keeps_endpoint_with_short_last_gap():
    p = preprocess([np.array([[0.0, 0.0], [1.0, 0.0]])], resample=0.3, scale=1.0)
    assert np.allclose(p[:, 0], [0, 0.3, 0.6, 0.9, 1.0])
    assert p[:, 2].tolist() == [0, 0, 0, 0, 1]


def _walk(stroke: np.ndarray, step: float) -> list[list[float]]:
    """Independent reference: walk the polyline, emit a point every ``step``, then the end point."""
    out, carried = [list(stroke[0])], 0.0  # carried: arc length since the last emitted point
    for a, b in zip(stroke[:-1], stroke[1:]):
        seg = float(np.hypot(*(b - a)))
        pos = step - carried  # where on this segment the next sample falls
        while pos <= seg + 1e-12:
            out.append(list(a + (b - a) * (pos / seg)))
            pos += step
        carried = seg - (pos - step)
    if np.hypot(*(np.array(out[-1]) - stroke[-1])) > 1e-6 * step:
        out.append(list(stroke[-1]))
    return out


def test_preprocess_resampling_matches_a_reference_walk():
    rng = np.random.default_rng(3)
    for _ in range(20):
        strokes = [
            np.cumsum(rng.normal(size=(rng.integers(1, 8), 2)), axis=0) for _ in range(rng.integers(1, 6))
        ]
        strokes[0] = np.repeat(strokes[0], 2, axis=0)  # repeated points must not matter
        p = preprocess(strokes, resample=0.07, scale=1.0, max_len=None)
        norm = [
            (s - strokes[0][0]) / max(np.linalg.norm(np.concatenate(strokes) - strokes[0][0], axis=1))
            for s in strokes
        ]
        ref = [pt for s in norm for pt in _walk(s, 0.07)]
        assert np.allclose(p[:, :2], ref, atol=1e-9)
        assert p[:, 2].sum() == len(strokes)


def test_preprocess_skip_reasons():
    line = [np.array([[0.0, 0.0], [1.0, 0.0]])]
    assert preprocess(line, max_len=20) is SkipReason.TOO_LONG  # 21 points
    assert isinstance(preprocess(line, max_len=21), np.ndarray)
    many = [np.array([[i, 0.0], [i, 1.0]]) for i in range(26)]
    assert preprocess(many, max_len=None) is SkipReason.TOO_MANY_STROKES
    assert isinstance(preprocess(many[:25], max_len=None), np.ndarray)
    assert preprocess([]) is SkipReason.EMPTY
    assert preprocess([np.zeros((0, 2))]) is SkipReason.EMPTY
    assert preprocess([np.array([[2.0, 3.0], [2.0, 3.0]]), np.array([[2.0, 3.0]])]) is SkipReason.DEGENERATE
    assert preprocess([np.array([[0.0, 0.0], [np.nan, 1.0]])]) is SkipReason.MALFORMED

    ds = StrokeDataset.from_drawings([line, many, [], line], max_len=50, source="toy")
    assert len(ds) == 2 and ds.lengths.tolist() == [21, 21]
    assert ds.report.total == 4 and ds.report.used == 2
    assert ds.report.skipped == {"too_many_strokes": 1, "empty": 1}
    assert ds.report.examples == [("toy[1]", "too_many_strokes"), ("toy[2]", "empty")]


def test_velocity_round_trip():
    rng = np.random.default_rng(0)
    p = np.concatenate([rng.normal(size=(50, 2)) * 5, (rng.random((50, 1)) < 0.2)], axis=1)
    v = to_velocity(p)
    assert np.array_equal(v[0], p[0])
    assert np.allclose(v[1:, :2], p[1:, :2] - p[:-1, :2])
    assert np.array_equal(v[:, 2], p[:, 2])
    assert np.allclose(from_velocity(v), p, atol=1e-12, rtol=0)
    assert np.allclose(to_velocity(from_velocity(v)), v, atol=1e-12, rtol=0)


def test_dataset_representations_agree():
    drawings = [[np.array([[0.0, 0.0], [1.0, 2.0], [3.0, 1.0]])], [np.array([[1.0, 1.0], [1.0, 4.0]])]]
    vel = StrokeDataset.from_drawings(drawings, "velocity")
    ab = StrokeDataset.from_drawings(drawings, "absolute")
    assert vel[0].dtype == torch.float32 and vel[0].shape == (len(vel.sequences[0]), 3)
    for i in range(2):
        assert np.allclose(vel.absolute(i), ab.sequences[i], atol=1e-4)
        assert np.allclose(ab.absolute(i), ab.sequences[i])
    assert not torch.equal(vel[0], ab[0])
    with pytest.raises(ConfigError, match="representation"):
        StrokeDataset([], representation="polar")


def test_collate_pads_and_masks():
    seqs = [torch.ones(2, 3), 2 * torch.ones(5, 3), np.full((3, 3), 3.0)]
    b = collate_strokes(seqs)
    assert b["x"].shape == (3, 5, 3) and b["x"].dtype == torch.float32
    assert b["lengths"].tolist() == [2, 5, 3] and b["lengths"].dtype == torch.int64
    assert b["mask"].dtype == torch.bool and b["mask"].sum(1).tolist() == [2, 5, 3]
    assert torch.equal(b["mask"][0], torch.tensor([True, True, False, False, False]))
    assert (b["x"][~b["mask"]] == 0).all()
    assert torch.equal(b["x"][b["mask"]][:, 0], torch.tensor([1.0] * 2 + [2.0] * 5 + [3.0] * 3))


def test_split_indices():
    tr, va = split_indices(100)
    assert len(tr) == 85 and len(va) == 15
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(100))
    tr2, va2 = split_indices(100, seed=0)
    assert np.array_equal(tr, tr2) and np.array_equal(va, va2)
    _, va3 = split_indices(100, seed=1)
    assert not np.array_equal(np.sort(va), np.sort(va3))
    assert [len(x) for x in split_indices(10, 0.3)] == [7, 3]
    with pytest.raises(ConfigError):
        split_indices(10, 1.5)


def test_data_report_merge_and_str():
    a = DataReport(source="a")
    a.keep(3)
    a.skip("a:1", SkipReason.MALFORMED)
    b = DataReport(source="b")
    b.keep()
    b.skip("b:7", "empty")
    b.reject("b:2", SkipReason.TOO_LONG)
    m = a.merge(b)
    assert (m.total, m.used, m.skipped) == (6, 3, {"malformed": 1, "empty": 1, "too_long": 1})
    assert m.total == m.used + m.n_skipped
    assert json.loads(json.dumps(m.to_dict()))["skipped"] == {"empty": 1, "malformed": 1, "too_long": 1}
    assert "3 of 6 used" in str(m) and "a:1: malformed" in str(m)


# ---------------------------------------------------------------------------- registry


def test_build_stroke_dataset_hershey_split_and_caps():
    spec = DataSpec(name="hershey-digits", args={"augment": 2, "max_len": 400})
    tr = build_stroke_dataset(spec, "train")
    va = build_stroke_dataset(spec, "val")
    assert tr.report.total == 210 and tr.report.used == 210  # 70 glyphs x (1 + 2)
    assert len(tr) + len(va) == 210 and len(va) == round(210 * 0.15)
    assert set(tr.labels) == set("0123456789")
    assert tr.representation == "velocity" and np.array_equal(tr.sequences[0][0], [0, 0, 0])
    capped = build_stroke_dataset(
        DataSpec(name="hershey-digits", args={"augment": 2}, train_size=50), "train"
    )
    assert len(capped) == 50
    again = build_stroke_dataset(DataSpec(name="hershey-digits", args={"augment": 2}, train_size=50), "train")
    assert all(np.array_equal(x, y) for x, y in zip(capped.sequences, again.sequences))


def test_build_stroke_dataset_kanjivg_subset():
    spec = DataSpec(
        name="kanjivg", args={"chars": "一二三四五六七八九十木永森林", "representation": "absolute"}
    )
    tr = build_stroke_dataset(spec, "train")
    va = build_stroke_dataset(spec, "val")
    assert len(tr) == 12 and len(va) == 2 and tr.report.used == 14
    for i in range(len(tr)):
        p = tr.sequences[i]
        radius = np.linalg.norm(p[:, :2], axis=1).max()  # resampling may miss the farthest point a little
        assert np.array_equal(p[0, :2], [0, 0]) and 9.7 < radius <= 10 + 1e-6


def test_build_stroke_dataset_errors(tmp_path):
    with pytest.raises(ConfigError, match="kanjivg, quickdraw, vmnist, hershey-digits"):
        build_stroke_dataset(DataSpec(name="strokes"), "train")
    with pytest.raises(ConfigError, match="data.args colour"):
        build_stroke_dataset(DataSpec(name="kanjivg", args={"colour": 1}), "train")
    with pytest.raises(ConfigError, match="split"):
        build_stroke_dataset(DataSpec(name="kanjivg"), "test")
    with pytest.raises(DataError, match=r"data.args.path"):
        build_stroke_dataset(DataSpec(name="quickdraw", args={"path": str(tmp_path / "qd")}), "train")
    with pytest.raises(DataError, match="hershey-digits"):
        build_stroke_dataset(DataSpec(name="vmnist", args={"path": str(tmp_path / "vm")}), "train")


# ---------------------------------------------------------------------------- QuickDraw


CAT = [
    [np.array([[0, 0], [10, 0], [10, 5]]), np.array([[20, 20], [25, 30]])],
    [np.array([[255, 1], [0, 254]])],
    [np.array([[7, 7]])],
]


def test_quickdraw_ndjson_raw_simplified_and_malformed(tmp_path):
    raw = [
        {
            "word": "cat",
            "recognized": True,
            "drawing": [[s[:, 0].tolist(), s[:, 1].tolist(), list(range(len(s)))] for s in d],
        }
        for d in CAT
    ]
    lines = [json.dumps(raw[0])]
    lines += [
        "{not json",
        json.dumps({"word": "cat", "strokes": []}),  # no "drawing"
        json.dumps({"drawing": [[[1, 2, 3], [4, 5]]]}),  # xs and ys of different lengths
        json.dumps({"drawing": [[[1, 2], [4, 5], [0, 1], [9, 9]]]}),  # four lists in a stroke
        json.dumps({"drawing": [[["a", 2], [4, 5]]]}),  # not numbers
        json.dumps({"drawing": []}),  # empty
        "",  # blank lines are not items
        json.dumps(raw[1]),
        json.dumps({**raw[2], "recognized": False}),
    ]
    (tmp_path / "full_raw_cat.ndjson").write_text("\n".join(lines) + "\n")
    items, report = load_quickdraw(tmp_path)
    assert [c for c, _ in items] == ["cat"] * 3
    assert all(_same_strokes(s, d) for (_, s), d in zip(items, CAT))
    assert report.total == 9 and report.used == 3
    assert report.skipped == {"malformed": 5, "empty": 1}
    assert report.examples[0] == ("full_raw_cat.ndjson:2", "malformed")
    items, report = load_quickdraw(tmp_path / "full_raw_cat.ndjson", recognized_only=True)
    assert len(items) == 2 and report.skipped["not_recognized"] == 1
    assert len(read_ndjson(tmp_path / "full_raw_cat.ndjson", limit=1)) == 1

    simp = tmp_path / "simp"
    simp.mkdir()
    write_ndjson(simp / "dog.ndjson", CAT, word="dog")
    first = json.loads((simp / "dog.ndjson").read_text().splitlines()[0])
    assert first["drawing"][0] == [[0, 10, 10], [0, 0, 5]]  # simplified: [xs, ys]
    items, report = load_quickdraw(simp, categories=["dog"])
    assert all(_same_strokes(s, d) for (_, s), d in zip(items, CAT)) and report.used == 3
    with pytest.raises(DataError, match="found: dog"):
        load_quickdraw(simp, categories=["cat"])
    with pytest.raises(ConfigError, match="no 'train' split"):
        load_quickdraw(simp, split="train")


def test_quickdraw_npz_stroke3(tmp_path):
    # stroke-3 by hand: (dx, dy, pen), pen = 1 on the last point of each stroke
    s3 = np.array([[0, 0, 0], [10, 0, 0], [0, 5, 1], [10, 15, 0], [5, 10, 1]], dtype=np.int16)
    assert _same_strokes(stroke3_to_strokes(s3), [s.astype(float) for s in CAT[0]])
    assert np.array_equal(strokes_to_stroke3(CAT[0]), s3)
    bad = np.empty(3, dtype=object)
    bad[0], bad[1], bad[2] = s3, np.zeros((4, 2), np.int16), np.zeros((0, 3), np.int16)
    valid = np.empty(1, dtype=object)
    valid[0] = strokes_to_stroke3(CAT[1])
    np.savez(tmp_path / "cat.npz", train=bad, valid=valid, test=valid)
    items, report = load_quickdraw(tmp_path, split="train")
    assert len(items) == 1 and _same_strokes(items[0][1], CAT[0]) and items[0][0] == "cat"
    assert report.skipped == {"malformed": 1, "empty": 1}
    items, report = load_quickdraw(tmp_path / "cat.npz")  # all three splits
    assert len(items) == 3 and report.total == 5

    write_npz(tmp_path / "sketchrnn_dog.full.npz", {"train": CAT, "valid": CAT[:1], "test": CAT[1:]})
    assert category_of(tmp_path / "sketchrnn_dog.full.npz") == "dog"
    got = read_npz(tmp_path / "sketchrnn_dog.full.npz", split="train")
    assert all(_same_strokes(s, d) for (_, s), d in zip(got, CAT)) and len(got) == 3
    assert len(read_npz(tmp_path / "sketchrnn_dog.full.npz", split="valid")) == 1


def test_quickdraw_build_uses_npz_splits_and_ndjson_fraction(tmp_path):
    rng = np.random.default_rng(0)
    drawings = [[np.cumsum(rng.integers(-5, 6, size=(6, 2)), axis=0) + [0, 50]] for _ in range(40)]
    npz_dir, nd_dir = tmp_path / "npz", tmp_path / "nd"
    npz_dir.mkdir()
    nd_dir.mkdir()
    write_npz(npz_dir / "cat.npz", {"train": drawings[:30], "valid": drawings[30:], "test": drawings[:2]})
    write_ndjson(nd_dir / "cat.ndjson", drawings, word="cat")
    spec = DataSpec(name="quickdraw", args={"path": str(npz_dir), "resample": None, "max_len": None})
    tr, va = build_stroke_dataset(spec, "train"), build_stroke_dataset(spec, "val")
    assert (tr.report.total, va.report.total) == (30, 10)  # the file's own train / valid arrays
    assert len(tr) == tr.report.used and len(va) == va.report.used
    assert np.allclose(va.absolute(0), preprocess(drawings[30], resample=None, max_len=None), atol=1e-4)
    spec = DataSpec(name="quickdraw", root=str(nd_dir), args={"resample": None, "max_len": None})
    tr, va = build_stroke_dataset(spec, "train"), build_stroke_dataset(spec, "val")
    assert len(tr) + len(va) == tr.report.used and len(va) == round(tr.report.used * 0.15)


# ---------------------------------------------------------------------------- VMNIST and Hershey


def test_vmnist_folder_and_single_file(tmp_path):
    write_ndjson(tmp_path / "0.ndjson", CAT[:2])
    write_ndjson(tmp_path / "digit_7.ndjson", CAT)
    items, report = load_vmnist(tmp_path)
    assert [d for d, _ in items] == ["0", "0", "7", "7", "7"] and report.used == 5
    items, _ = load_vmnist(tmp_path, digits=[7], limit=2)
    assert [d for d, _ in items] == ["7", "7"] and _same_strokes(items[1][1], CAT[1])
    with pytest.raises(DataError, match="digits 3"):
        load_vmnist(tmp_path, digits="3")
    one = tmp_path / "single" / "vmnist.npz"
    one.parent.mkdir()
    write_npz(one, {"train": CAT, "valid": CAT[:1]}, labels={"train": ["4", "2", "4"], "valid": ["9"]})
    items, report = load_vmnist(one, split="train", digits="4")
    assert [d for d, _ in items] == ["4", "4"] and report.total == 2
    assert _same_strokes(items[1][1], CAT[2])


def test_hershey_digits():
    glyphs = hershey_digits()
    assert len(glyphs) == 70  # 29 fonts with digits share 7 designs of each digit
    assert sorted({d for d, _ in glyphs}) == list("0123456789")
    assert all(sum(d == x for x, _ in glyphs) == 7 for d in "0123456789")
    for _, strokes in glyphs:
        assert strokes and all(len(s) >= 1 and s.shape[1] == 2 for s in strokes)
        assert np.ptp(np.concatenate(strokes), axis=0).max() > 5  # a real glyph, not a dot
    assert len(hershey_digits(unique=False)) == 290
    assert len(hershey_digits(fonts=["futural"])) == 10
    aug = hershey_digits(fonts=["futural"], augment=3, seed=1)
    assert len(aug) == 40 and [d for d, _ in aug[:4]] == ["0"] * 4
    assert not np.allclose(aug[0][1][0], aug[1][1][0])  # the copy moved
    same = hershey_digits(fonts=["futural"], augment=3, seed=1)
    assert all(_same_strokes(a, b) for (_, a), (_, b) in zip(aug, same))
    other = hershey_digits(fonts=["futural"], augment=3, seed=2)
    assert not np.allclose(aug[1][1][0], other[1][1][0])
    with pytest.raises(ConfigError, match="no digit"):
        hershey_digits(fonts=["japanese"])
    with pytest.raises(ConfigError, match="unknown Hershey"):
        hershey_digits(fonts=["comic-sans"])


def test_random_affine_about_the_box_centre():
    strokes = [np.array([[0.0, 0.0], [4.0, 0.0]]), np.array([[4.0, 2.0], [2.0, 2.0], [0.0, 2.0]])]
    still = random_affine(strokes, np.random.default_rng(0), rotation=0.0, scale=(1.0, 1.0), shear=0.0)
    assert all(np.allclose(a, b) for a, b in zip(still, strokes))
    # a pure rotation by +-90 degrees keeps the centre (2, 1) and every distance from it
    turned = random_affine(strokes, np.random.default_rng(1), rotation=90.0, scale=(1.0, 1.0), shear=0.0)
    centre = np.array([2.0, 1.0])
    for a, b in zip(turned, strokes):
        assert np.allclose(np.linalg.norm(a - centre, axis=1), np.linalg.norm(b - centre, axis=1))
    th = np.deg2rad(np.random.default_rng(1).uniform(-90.0, 90.0))
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])  # (2, 2), counter-clockwise
    assert np.allclose(turned[0], (strokes[0] - centre) @ rot.T + centre)
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    a = random_affine(strokes, rng_a, 10.0, (0.8, 1.2), 0.2)
    b = random_affine(strokes, rng_b, 10.0, (0.8, 1.2), 0.2)
    assert _same_strokes(a, b) and rng_a.random() == rng_b.random()  # same draws, same copy


# ---------------------------------------------------------------------------- raster and SVG


def test_rasterize_horizontal_and_vertical_lines():
    img = rasterize([np.array([[0.0, 0.0], [10.0, 0.0]])], size=32, line_width=2.0, padding=0.1)
    assert img.shape == (32, 32) and img.dtype == np.uint8
    rows = img.mean(axis=1)
    assert rows[15:17].min() > 100 and rows[:12].max() == 0 and rows[20:].max() == 0
    assert img[16, 4:28].min() > 100  # lit along the line, inside the padding
    assert img[:, 0].max() == 0  # padding stays dark
    vert = rasterize(np.array([[5.0, 0.0], [5.0, 10.0]]), size=32, antialias=False)
    assert set(np.unique(vert)) == {0, 255}
    assert vert[:, 15:17].mean(axis=0).max() > 150 and vert[:, :12].max() == 0


def test_rasterize_point_sequence_lifts_the_pen():
    pts = np.array([[0, 0, 0], [4, 0, 1], [6, 0, 0], [10, 0, 1]], dtype=float)  # two dashes
    img = rasterize(pts, size=40, line_width=1.0, padding=0.0, antialias=False)
    row = img[20] if img[20].any() else img[19]
    assert row[:12].min() == 255 and row[-12:].min() == 255
    assert row[19:21].max() == 0  # the gap between the strokes stays dark
    joined = rasterize(pts[:, :2], size=40, line_width=1.0, padding=0.0, antialias=False)  # one stroke
    assert joined[19:21, 19:21].max() == 255
    assert rasterize([], size=8).max() == 0


def test_svg_and_grid(tmp_path):
    strokes = [np.array([[0.0, 0.0], [10.0, 0.0], [10.0, 10.0]]), np.array([[3.0, 3.0]])]
    svg = to_svg(strokes, size=100)
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    paths = root.findall(f".//{ns}path")
    assert root.tag == f"{ns}svg" and len(paths) == 2
    first = parse_path(paths[0].get("d"))[0]
    assert np.allclose(first, [[10, 10], [90, 10], [90, 90]], atol=0.01)  # fit with 10 % padding
    grid = make_grid([np.full((4, 5), 255, np.uint8)] * 3, ncol=2, pad=1)
    assert grid.shape == (2 * 5 + 1, 2 * 6 + 1)
    assert grid[1:5, 1:6].min() == 255 and grid[0].max() == 128 and grid[6:10, 7:12].max() == 128
    out = save_grid(np.zeros((3, 8, 8), np.uint8), tmp_path / "g" / "grid.png", ncol=3)
    from PIL import Image

    assert Image.open(out).size == (3 * 10 + 2, 12)
