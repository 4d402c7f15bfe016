"""Speed and memory of truly sparse training (``sparsify(..., backend="sparse")``) against dense training.

    .venv/bin/python benchmarks/sparse_training.py            # every section (hours on 2 cores)
    .venv/bin/python benchmarks/sparse_training.py --quick    # ldm-fmnist and dit-xs-fmnist, 90 % only

- ``steps``: the whole training step (forward, a mean-square loss, backward, AdamW step, ``engine.step()``,
  ``zero_grad``) of RigL ERK on compact layers against the same model trained plainly dense (AdamW, no
  engine); the masked-dense engine is a third column, for information. Three copies of one seeded model
  step in turn, the order reversed every cycle of ``--period`` steps, each cycle ending in a topology
  update. A step is *ordinary*, an *update step* (RigL's dense-gradient capture in the backward, the
  drop/grow in ``engine.step()``) or the step *after* one (a layer on the sparse kernels rebuilds what it
  derives from its layout). An update costs ``(update step - ordinary) + (after - ordinary)``; the step
  time is ``ordinary + that / --update-every``: ``(98 * ordinary + update step + after) / 100``. Medians of
  ``--repeats`` cycles after an untimed one (first calls; with ``--kernels measure`` each compact layer
  times its sparse and dense kernels at its first call). How many layers went sparse / dense is recorded.
- ``split``: at 90 %, each backend's median ordinary and update step in forward, backward, optimiser
  (AdamW step and ``zero_grad``) and engine step.
- ``layers``: at density 0.1 on ``sparse_runtime.py``'s layer shapes, a compact layer on the sparse
  kernels (built from the masked dense layer) against the masked dense layer under torch: forward
  (recording the graph), input gradient, values gradient, forward + backward.
- ``memory``: at 90 %, the training state counted from the tensors after ``optimizer.step()`` of an
  ordinary and of an update step, each storage once: parameters, gradients, optimiser state, engine and
  index state (the masked engine's masks and kept dense gradients; a compact layer's ``row_ptr`` /
  ``cols``, what it derives from them, RigL's captured candidates). And the peak RSS (``VmHWM``) of a
  training process, a subprocess per model and backend: the setup's peak (the model is built dense
  before ``sparsify`` converts it), then, after a ``malloc_trim``, the peak reset (``clear_refs``) and
  read again over ``--period + 1`` training steps (an update included).

Ratios are dense / sparse: > 1 means sparse is faster or smaller. Timings are only worth something on a
quiet machine. ``--table`` prints the markdown tables of a results file.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import sparsediff
from sparse_runtime import _mask_, layer_cases, only_the_table, timed
from sparsediff.config import load_config
from sparsediff.models import build_model
from sparsediff.sparse.runtime.choose import choose_mode
from sparsediff.sparse.runtime.compact_conv import CompactConv
from sparsediff.sparse.runtime.compact_gru import CompactGRU
from sparsediff.sparse.runtime.compact_linear import CompactLinear

OUT = Path(__file__).parent / "results" / "sparse_training.json"

# name -> (preset, training batch). The CPU-scale presets at batch 32 (ldm-fmnist's own training batch);
# the paper-scale ones at 2 (seconds per dense step on 2 cores). "linear12" is the issue's
# weight-dominated model: 12 x Linear(2048, 2048) with GELUs between them, on 32 rows of 2048 features.
MODELS: dict[str, tuple[str | None, int]] = {
    "ldm-fmnist": ("ldm-fmnist", 32),
    "dit-xs-fmnist": ("dit-xs-fmnist", 32),
    "chirodiff-kanjivg": ("chirodiff-kanjivg", 32),
    "dit-s-latent64": ("dit-s-latent64", 2),
    "ldm-celebahq": ("ldm-celebahq", 2),
    "linear12": (None, 32),
}
PAPER_SCALE = ("dit-s-latent64", "ldm-celebahq")  # fewer repeats: seconds per step
SEQ_LEN = 256  # ChiroDiff: padded length; lengths drawn in [SEQ_LEN / 2, SEQ_LEN] (the preset keeps <= 300)
BACKENDS = ("dense", "masked", "sparse")  # plain dense, the masked-dense engine, compact layers
LR, WEIGHT_DECAY = 1e-4, 1e-2
LAYER_DENSITY = 0.1
PHASES = ("forward", "backward", "optimiser", "engine")


# ---------------------------------------------------------------------------- models and runs


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    preset = MODELS[name][0]
    if preset is None:
        layers: list[nn.Module] = []
        for i in range(12):
            layers += [nn.Linear(2048, 2048)] + ([nn.GELU()] if i < 11 else [])
        return nn.Sequential(*layers)
    return build_model(load_config(preset).model).train()


def batches(name: str, model: nn.Module, batch: int, count: int = 2) -> list[tuple[tuple, torch.Tensor]]:
    """``count`` (inputs, target) pairs: random noisy inputs, random timesteps, a random target of the
    output's shape (what the loss compares with: the noise)."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(count):
        if MODELS[name][0] is None:
            xs: tuple = (torch.randn(batch, 2048, generator=gen),)
        elif hasattr(model, "gru"):  # ChiroDiff: (x, t, lengths), ragged
            x, t, _ = model.example_inputs(batch, SEQ_LEN)
            lengths = torch.randint(SEQ_LEN // 2, SEQ_LEN + 1, (batch,), generator=gen)
            lengths[0] = SEQ_LEN
            t = torch.randint(0, 1000, t.shape, generator=gen)
            xs = (torch.randn(x.shape, generator=gen), t, lengths)
        else:
            xs = list(model.example_inputs(batch))
            xs[0] = torch.randn(xs[0].shape, generator=gen)
            xs[1] = torch.randint(0, 1000, xs[1].shape, generator=gen)
            xs = tuple(xs)
        with torch.no_grad():
            shape = model(*xs).shape
        out.append((xs, torch.randn(shape, generator=gen)))
    return out


class Run:
    """One copy of the model with its optimiser and (but for plain dense) its engine; steps it, timed."""

    def __init__(self, backend: str, model: nn.Module, name: str, sparsity: float, args: argparse.Namespace):
        self.backend, self.model, self.period = backend, model, args.period
        self.opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        self.engine = None
        if backend != "dense":
            preset = MODELS[name][0]
            spec = load_config(preset).sparse if preset is not None else None
            kernels = args.kernels if backend == "sparse" else None  # None: the spec's (unused by "dense")
            self.engine = sparsediff.sparsify(
                model, self.opt, spec, method="rigl", sparsity=sparsity, distribution="erk", kernels=kernels,
                update_every=args.period, end_step="never", decay="constant",
                backend="sparse" if backend == "sparse" else "dense",
            )  # fmt: skip
        self.steps = 0
        self.samples: dict[str, list[dict[str, float]]] = {"ordinary": [], "update": [], "after": []}
        self.memory: dict[str, dict[str, int]] = {}

    def kind(self) -> str:
        s = self.steps + 1
        if s % self.period == 0:
            return "update"
        return "after" if s % self.period == 1 and s > 1 else "ordinary"

    def step(self, inputs: tuple, target: torch.Tensor, record: bool = True, count: bool = False) -> None:
        kind = self.kind()
        t0 = time.perf_counter()
        loss = (self.model(*inputs) - target).pow(2).mean()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        self.opt.step()
        t3 = time.perf_counter()
        if count and kind != "after" and kind not in self.memory:
            self.memory[kind] = state_bytes(self)  # untimed: the counting sits between t3 and t3b
        t3b = time.perf_counter()
        if self.engine is not None:
            self.engine.step()
        t4 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        t5 = time.perf_counter()
        self.steps += 1
        if record:
            phases = {"forward": t1 - t0, "backward": t2 - t1, "optimiser": (t3 - t2) + (t5 - t4)}
            phases["engine"] = t4 - t3b
            phases["step"] = sum(phases.values())
            self.samples[kind].append(phases)

    def median(self, kinds: tuple[str, ...], phase: str = "step") -> float:
        values = [s[phase] for k in kinds for s in self.samples[k]]
        return statistics.median(values) if values else float("nan")

    def layer_modes(self) -> list[dict[str, Any]]:
        """Each compact layer's kernel mode (and its measured times, with ``kernels="measure"``)."""
        hosts = {}
        for name, target in self.engine.targets.items():  # a GRU hosts several targets: counted once
            hosts.setdefault(id(target.host), (name, target.host))
        return [
            {"layer": n, "kind": h.kind, "mode": h.kernel_mode, **getattr(h, "choice", {})}
            for n, h in hosts.values()
        ]


def make_runs(name: str, sparsity: float, args: argparse.Namespace, backends=BACKENDS) -> tuple[dict, list]:
    """A run per backend, all from one seeded model, and the batches they train on (made on the dense
    model: a compact layer chooses its kernels at its first call, which belongs to the first step)."""
    base = build(name)
    data = batches(name, base, args.batch_of[name])
    models = [copy.deepcopy(base) for _ in backends[1:]] + [base]  # copies before any is sparsified
    del base
    runs = {b: Run(b, m, name, sparsity, args) for b, m in zip(backends, models)}
    gc.collect()
    return runs, data


# ---------------------------------------------------------------------------- training state in bytes


def _tensors(obj: Any, seen: set[int], depth: int = 0):
    """Every tensor reachable from ``obj`` through containers and plain objects (not through modules or
    optimisers, which are counted as parameters / optimiser state)."""
    if id(obj) in seen or depth > 8:
        return
    seen.add(id(obj))
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, (nn.Module, torch.optim.Optimizer, type, str, bytes)):
        return
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v, seen, depth + 1)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            yield from _tensors(v, seen, depth + 1)
    elif hasattr(obj, "__dict__"):
        yield from _tensors(vars(obj), seen, depth + 1)


def state_bytes(run: Run) -> dict[str, int]:
    """Bytes held for training, by kind; a storage shared by several tensors is counted once, in the
    first kind that holds it (parameters, gradients, optimiser, engine, the model's other buffers)."""
    counted: set[tuple[int, str]] = set()

    def add(tensors) -> int:
        total = 0
        for t in tensors:
            storage = t.untyped_storage()
            key = (storage.data_ptr(), str(t.device))
            if storage.nbytes() == 0 or key in counted:
                continue
            counted.add(key)
            total += storage.nbytes()
        return total

    params = list(run.model.parameters())
    out = {"params": add(params), "grads": add(p.grad for p in params if p.grad is not None)}
    out["optimiser"] = add(_tensors(run.opt.state, set()))
    engine = 0
    if run.engine is not None:
        engine = add(_tensors(vars(run.engine), set()))
        for m in run.model.modules():  # compact layers: index buffers, derived structures, RigL captures
            for cw in getattr(m, "compact_weights", {}).values():
                engine += add([cw.row_ptr(m), cw.cols(m)])
            engine += add(_tensors(m.__dict__.get("_compact_cache"), set()))
            engine += add(_tensors(getattr(m, "capture", None), set()))
    out["engine"] = engine
    out["buffers"] = add(run.model.buffers())
    out["total"] = sum(out.values())
    return out


# ---------------------------------------------------------------------------- steps and split


def bench_steps(name: str, sparsity: float, repeats: int, args, count: bool) -> tuple:
    """One model at one sparsity: (the steps row, the split rows, the state counts of each backend)."""
    runs, data = make_runs(name, sparsity, args)
    order = list(BACKENDS)
    t0 = time.perf_counter()
    for i in range(args.period):  # warm-up cycle: kernel choice, first optimiser state, one update
        for b in order:
            runs[b].step(*data[i % len(data)], record=False, count=count)
    warmup_s = time.perf_counter() - t0
    for c in range(repeats):
        for i in range(args.period):
            for b in order if c % 2 == 0 else order[::-1]:
                runs[b].step(*data[i % len(data)])
    n = args.update_every
    row: dict[str, Any] = {"model": name, "batch": args.batch_of[name], "sparsity": sparsity}
    row["kernels"] = args.kernels
    for b, run in runs.items():
        ordinary = run.median(("ordinary",))
        if b == "dense":
            row["dense_ms"] = run.median(("ordinary", "update", "after")) * 1e3
            continue
        update, after = run.median(("update",)), run.median(("after",))
        cost = (update - ordinary) + (after - ordinary)
        row[f"{b}_ms"] = (ordinary + cost / n) * 1e3  # (98 * ordinary + update + after) / 100 for n = 100
        row[f"{b}_ordinary_ms"], row[f"{b}_update_ms"] = ordinary * 1e3, cost * 1e3
        row[f"{b}_update_step_ms"], row[f"{b}_after_update_ms"] = update * 1e3, after * 1e3
    row["speedup"] = row["dense_ms"] / row["sparse_ms"]
    row["masked_speedup"] = row["dense_ms"] / row["masked_ms"]
    row["layer_modes"] = modes = runs["sparse"].layer_modes()
    row["layers_sparse"] = sum(x["mode"] == "sparse" for x in modes)
    row["layers_dense"] = len(modes) - row["layers_sparse"]
    masked, sparse = runs["masked"].engine.masks, runs["sparse"].engine.masks
    row["masks_agree"] = f"{sum(torch.equal(masked[k], sparse[k]) for k in masked)}/{len(masked)}"
    row["updates"] = runs["sparse"].engine.num_updates
    row["timed_steps"] = repeats * args.period
    row["warmup_s"] = warmup_s
    split = [
        {"model": name, "backend": b, "step_kind": kind}
        | {f"{p}_ms": run.median((kind,), p) * 1e3 for p in (*PHASES, "step")}
        for b, run in runs.items()
        for kind in (("ordinary",) if b == "dense" else ("ordinary", "update"))
    ]
    return row, split, {b: run.memory for b, run in runs.items()}


# ---------------------------------------------------------------------------- layers


def _layer_pair(case: dict[str, Any]):
    """The masked dense layer of ``case`` at LAYER_DENSITY and its compact twin on the sparse kernels."""
    gen, kind = torch.Generator().manual_seed(0), case["kind"]
    if kind == "linear":
        dense: nn.Module = nn.Linear(case["k"], case["m"])
        x = torch.randn(case["n"], case["k"], generator=gen)
    elif kind == "conv":
        dense = nn.Conv2d(case["c"], case["c"], 3, padding=1)
        x = torch.randn(case["b"], case["c"], case["hw"], case["hw"], generator=gen)
    else:
        dense = nn.GRU(case["h"], case["h"], batch_first=True)
        x = torch.randn(case["b"], case["t"], case["h"], generator=gen)
    _mask_(dense, LAYER_DENSITY, gen)
    masks = {n: p.detach() != 0 for n, p in dense.named_parameters() if p.dim() >= 2}
    twin = copy.deepcopy(dense)  # the compact layer keeps its dense layer's biases: a copy's
    if kind == "gru":
        compact: nn.Module = CompactGRU(twin, masks)
    else:
        compact = (CompactLinear if kind == "linear" else CompactConv)(twin, masks["weight"])
    choose_mode(compact, x, policy="sparse")
    dense_w = [p for p in dense.parameters() if p.dim() >= 2]
    compact_w = [cw.values(compact) for cw in compact.compact_weights.values()]
    weights = {"dense": dense_w, "sparse": compact_w}
    biases = {
        "dense": [p for p in dense.parameters() if p.dim() < 2],
        "sparse": [p for p in compact.parameters() if not any(p is w for w in compact_w)],
    }
    return {"dense": dense, "sparse": compact}, x, weights, biases


def _first(y):
    return y[0] if isinstance(y, tuple) else y


def bench_layer(case: dict[str, Any], repeats: int) -> dict[str, Any]:
    layers, x, weights, biases = _layer_pair(case)
    xin, xno = x.clone().requires_grad_(True), x.clone()
    dy = torch.randn(_first(layers["dense"](x)).shape, generator=torch.Generator().manual_seed(2))

    def flags(b: str, w: bool, bias: bool) -> None:
        for p in weights[b]:
            p.requires_grad_(w)
        for p in biases[b]:
            p.requires_grad_(bias)

    def calls(b: str, layer: nn.Module) -> dict[str, Any]:
        flags(b, False, False)
        y_dx = _first(layer(xin))  # graphs built once; the gradient calls keep them (retain_graph)
        flags(b, True, False)
        y_dv = _first(layer(xno))

        def call(w: bool, bias: bool, fn):
            def run():
                flags(b, w, bias)  # what needs a gradient is fixed when a graph is built
                return fn()

            return run

        grad, every = torch.autograd.grad, [xin, *weights[b], *biases[b]]
        return {
            "forward": call(True, True, lambda: _first(layer(xin))),
            "input_grad": call(False, False, lambda: grad(y_dx, xin, dy, retain_graph=True)),
            "values_grad": call(True, False, lambda: grad(y_dv, weights[b], dy, retain_graph=True)),
            "forward_backward": call(True, True, lambda: grad(_first(layer(xin)), every, dy)),
        }

    fns = {b: calls(b, layer) for b, layer in layers.items()}
    got = {b: fns[b]["forward_backward"]() for b in layers}
    compact, dense_dv = layers["sparse"], got["dense"][1 : 1 + len(weights["dense"])]
    gathered = [cw.gather(compact, g) for cw, g in zip(compact.compact_weights.values(), dense_dv)]

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))

    row: dict[str, Any] = {"layer": case["name"], "density": LAYER_DENSITY}
    row["input_grad_rel_diff"] = rel(got["sparse"][0], got["dense"][0])
    row["values_grad_rel_diff"] = max(rel(a, b) for a, b in zip(got["sparse"][1:], gathered))
    for what in ("forward", "input_grad", "values_grad", "forward_backward"):
        t_dense, t_sparse = timed([fns["dense"][what], fns["sparse"][what]], repeats, min_seconds=0.05)
        row.update({f"{what}_dense_ms": t_dense * 1e3, f"{what}_sparse_ms": t_sparse * 1e3})
        row[f"{what}_speedup"] = t_dense / t_sparse
    return row


# ---------------------------------------------------------------------------- peak RSS (subprocesses)


def _status_kb(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def rss_worker(name: str, backend: str, sparsity: float, args: argparse.Namespace) -> None:
    """Build, sparsify, train ``--period + 1`` steps; print the peaks (kB) as one JSON line."""
    after_import = _status_kb("VmRSS")
    runs, data = make_runs(name, sparsity, args, backends=(backend,))
    run = runs.pop(backend)
    gc.collect()
    with contextlib.suppress(OSError):  # the freed dense weights back to the system: the peak is training's
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    setup_peak, after_setup = _status_kb("VmHWM"), _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    peaks = []  # VmHWM after each step: where the peak happens (the first step, the update step)
    for i in range(args.period + 1):
        run.step(*data[i % len(data)], record=False)
        peaks.append(_status_kb("VmHWM"))
    result = {
        "model": name, "backend": backend, "sparsity": sparsity, "batch": args.batch_of[name],
        "rss_after_import_kb": after_import, "setup_peak_kb": setup_peak, "rss_after_setup_kb": after_setup,
        "train_peak_kb": peaks[-1], "peak_after_step_kb": peaks, "train_steps": run.steps,
        "updates": run.engine.num_updates if run.engine is not None else 0,
    }  # fmt: skip
    print(json.dumps(result))


def bench_rss(name: str, backend: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--rss-worker", name, backend, "0.9"]
    cmd += ["--threads", str(args.thread_counts[-1]), "--kernels", args.kernels, "--period", str(args.period)]
    cmd += ["--batch", f"{name}={args.batch_of[name]}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the RSS worker for {name} / {backend} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- tables


def _mb(n: float) -> str:
    return f"{n / 2**20:.2f} MB" if n < 10 * 2**20 else f"{n / 2**20:.1f} MB"


def _ms(v: float) -> str:
    return f"{v:.1f} ms" if v >= 10 else f"{v:.2f} ms"


def _table(header: str, rows: list[list[str]]) -> list[str]:
    if not rows:  # a section not measured
        return []
    out = ["| " + header + " |", "|" + "---|" * len(header.split(" | "))]
    return ["", *out, *("| " + " | ".join(r) + " |" for r in rows)]


def table(path: Path) -> str:
    """Markdown tables of a results file (for benchmarks/README.md)."""
    r = json.loads(Path(path).read_text())
    s = r.get("settings", {})
    out = [
        f"kernels `{s.get('kernels')}`, a topology update every {s.get('update_every')} steps (amortised), "
        f"{s.get('optimizer')}, medians of {s.get('repeats')} cycles of {s.get('period')} steps"
    ]
    rows = [
        [x["model"], str(x["batch"]), f"{x['sparsity']:.0%}", str(x["threads"]), _ms(x["dense_ms"]),
         _ms(x["masked_ms"]), _ms(x["sparse_ms"]), f"**{x['speedup']:.2f}x**", f"{x['masked_speedup']:.2f}x",
         _ms(x["sparse_ordinary_ms"]), _ms(x["sparse_update_ms"]),
         f"{x['layers_sparse']} / {x['layers_dense']}"]
        for x in r.get("steps", [])
    ]  # fmt: skip
    out += _table(
        "model | batch | sparsity | threads | dense | masked | sparse | **dense / sparse** | dense / masked "
        "| sparse ordinary | sparse update (extra) | layers sparse / dense",
        rows,
    )
    rows = [
        [x["model"], str(x["threads"]), x["backend"], x["step_kind"],
         *(_ms(x[f"{p}_ms"]) for p in (*PHASES, "step"))]
        for x in r.get("split", [])
    ]  # fmt: skip
    header = "model (90 %) | threads | backend | step | forward | backward | optimiser | engine | step total"
    out += _table(header, rows)
    rows = [
        [x["layer"], str(x["threads"]),
         *(f"{x[f'{w}_speedup']:.2f}x" for w in ("forward", "input_grad", "values_grad")),
         _ms(x["forward_backward_dense_ms"]), _ms(x["forward_backward_sparse_ms"]),
         f"**{x['forward_backward_speedup']:.2f}x**"]
        for x in r.get("layers", [])
    ]  # fmt: skip
    out += _table(
        "layer (density 0.1) | threads | forward | input grad | values grad | fwd + bwd dense "
        "| fwd + bwd sparse | **fwd + bwd speed-up**",
        rows,
    )
    rows = [
        [x["model"], x["backend"], *(_mb(x["update"][k]) for k in ("params", "grads", "optimiser")),
         f"{_mb(x['ordinary']['engine'])} / {_mb(x['update']['engine'])}", _mb(x["update"]["total"]),
         f"**{x['dense_over_this']:.2f}x**"]
        for x in r.get("memory", [])
    ]  # fmt: skip
    out += _table(
        "model (90 %) | backend | parameters | gradients | optimiser | engine + index (ordinary / update) "
        "| total (update step) | **dense / this**",
        rows,
    )
    rows = [
        [x["model"], x["backend"],
         *(_mb(x[k] * 1024) for k in ("rss_after_import_kb", "setup_peak_kb", "train_peak_kb")),
         _mb((x["train_peak_kb"] - x["rss_after_import_kb"]) * 1024), f"**{x['dense_over_this']:.2f}x**"]
        for x in r.get("rss", [])
    ]  # fmt: skip
    out += _table(
        "model (90 %) | backend | after imports | setup peak | training peak | training peak - imports "
        "| **dense / this** (training peak - imports)",
        rows,
    )
    return "\n".join(out)


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="ldm-fmnist and dit-xs-fmnist, 90 %% only")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--sparsities", default="0.5,0.75,0.9,0.95")
    ap.add_argument("--threads", default="2", help="torch thread counts, e.g. 1,2")
    ap.add_argument("--repeats", type=int, default=6, help="timed cycles (paper scale: half, at least 2)")
    ap.add_argument("--kernels", default="measure", choices=("auto", "measure", "sparse", "dense"))
    ap.add_argument("--sections", default="steps,split,layers,memory")
    ap.add_argument("--period", type=int, default=4, help="steps per cycle: one topology update each (>= 3)")
    ap.add_argument("--update-every", type=int, default=100, help="the update interval amortised over")
    ap.add_argument("--batch", default="", help="training batch per model, e.g. ldm-celebahq=1")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--table", action="store_true", help="print the markdown tables of --out and exit")
    ap.add_argument("--rss-worker", nargs=3, metavar=("MODEL", "BACKEND", "SPARSITY"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.batch_of = {n: b for n, (_, b) in MODELS.items()}
    for part in filter(None, args.batch.split(",")):
        name, _, value = part.partition("=")
        if name not in MODELS or not value.isdigit():
            ap.error(f"--batch takes NAME=N,... with NAME one of {', '.join(MODELS)}; got {part!r}")
        args.batch_of[name] = int(value)
    args.thread_counts = [int(t) for t in args.threads.split(",")]
    if args.period < 3:
        ap.error("--period must be at least 3 (an ordinary step, an update step, the step after it)")
    return args


def _emit(result: dict[str, Any], section: str, rows: list[dict[str, Any]]) -> None:
    for row in rows:
        result[section].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "layer_modes"}), flush=True)


def main() -> None:
    args = parse_args()
    if args.rss_worker:
        torch.set_num_threads(args.thread_counts[-1])
        rss_worker(args.rss_worker[0], args.rss_worker[1], float(args.rss_worker[2]), args)
        return
    if only_the_table(args, table):
        return
    sections = set(args.sections.split(","))
    models = [m for m in args.models.split(",") if m]
    if any(m not in MODELS for m in models):
        raise SystemExit(f"--models: choose from {', '.join(MODELS)}")
    sparsities, repeats = [float(s) for s in args.sparsities.split(",")], args.repeats
    if args.quick:
        sparsities, repeats = [0.9], 2
        models = [m for m in models if m in ("ldm-fmnist", "dit-xs-fmnist")]
    result: dict[str, Any] = {
        "machine": {
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "torch": torch.__version__, "python": sys.version.split()[0],
        },
        "settings": {
            "threads": args.thread_counts, "repeats": repeats, "kernels": args.kernels, "period": args.period,
            "update_every": args.update_every, "batch": {m: args.batch_of[m] for m in models},
            "chirodiff_seq_len": SEQ_LEN, "optimizer": f"AdamW lr {LR} weight decay {WEIGHT_DECAY}",
            "loss": "mean square of output - a random target", "method": "rigl, erk, constant prune ratio",
        },
        "steps": [], "split": [], "layers": [], "memory": [], "rss": [],
    }  # fmt: skip
    timing = bool(sections & {"steps", "split"})
    for threads in args.thread_counts:
        torch.set_num_threads(threads)
        count = "memory" in sections and threads == args.thread_counts[-1]
        for name in models:
            reps = (max(2, repeats // 2) if name in PAPER_SCALE else repeats) if timing else 0
            wanted = list(sparsities) if "steps" in sections else []
            wanted += [0.9] if ("split" in sections or count) and 0.9 not in wanted else []
            for sparsity in wanted:
                row, split, memory = bench_steps(name, sparsity, reps, args, count)
                if "steps" in sections and sparsity in sparsities:
                    _emit(result, "steps", [{"threads": threads, **row}])
                if "split" in sections and sparsity == 0.9:
                    result["split"] += [{"threads": threads, **x} for x in split]
                if count and sparsity == 0.9:
                    dense = memory["dense"]["update"]["total"]
                    rows = [{"model": name, "backend": b, "sparsity": 0.9, **m} for b, m in memory.items()]
                    _emit(
                        result,
                        "memory",
                        [r | {"dense_over_this": dense / r["update"]["total"]} for r in rows],
                    )
        if "layers" in sections:
            rows = [{"threads": threads, **bench_layer(case, max(3, repeats))} for case in layer_cases()]
            _emit(result, "layers", rows)
    for name in models if "memory" in sections else []:
        rows = [bench_rss(name, b, args) for b in BACKENDS]  # the ratio of what training adds to the imports
        used = [r["train_peak_kb"] - r["rss_after_import_kb"] for r in rows]
        _emit(result, "rss", [r | {"dense_over_this": used[0] / u} for r, u in zip(rows, used)])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
