"""The sparse settings, declared once: a run config's ``sparse:`` section and what an engine is built from.

:class:`SparseSpec` lists every setting of both engines. A run config embeds it (``sparse:`` in a preset,
``--set sparse.erk_power=0.5`` on the command line) and :func:`sparsediff.sparsify` takes it, or its
fields as keywords. Which fields apply depends on the method:

What each method is and needs is declared once, in :mod:`~sparsediff.sparse.methods` (the tuples below are
read off that registry):

- ``dense``, ``static``, ``rigl``, ``magran`` (:data:`UNSTRUCTURED_METHODS`, the :class:`SparseEngine`):
  ``sparsity``, ``distribution``, ``erk_power``, ``seed``, ``rescale_init``; and for the dynamic ones
  (RigL, MagRan) the drop/grow schedule ``prune_ratio``, ``decay``, ``update_every``, ``end_step`` /
  ``end_fraction``;
- ``srste`` (:data:`NM_METHODS`, the :class:`NMSparseEngine`): ``nm`` or a ``progressive`` schedule,
  ``srste_lambda``, ``nm_incompatible``; ``oneshot`` (magnitude N:M pruning without training, made by
  ``sparsediff finetune --method oneshot``) uses ``nm`` and ``nm_incompatible``;
- every method: ``include`` / ``exclude`` (which weights are targets).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from .distribution import DISTRIBUTIONS, check_sparsity
from .methods import REGISTRY, SparseMethod, get_method, method_names
from .nm import DEFAULT_NM, DEFAULT_SRSTE_LAMBDA, check_policy, parse_nm, parse_progressive
from .schedule import DECAYS, NEVER

BACKENDS = ("dense", "sparse")  # how sparse weights train: masked dense tensors, or compact ones
POLICIES = (
    "auto",
    "measure",
    "sparse",
    "dense",
)  # how a compact layer chooses its kernels (runtime/choose.py)

# Views of the method registry (sparse/methods.py), for choices and help texts.
METHODS = tuple(REGISTRY)
UNSTRUCTURED_METHODS = method_names(structured=False)
NM_METHODS = method_names(structured=True)
ENGINE_METHODS = method_names(has_engine=True)  # the methods sparsify() builds an engine for (trainable)
DYNAMIC_METHODS = method_names(dynamic=True)  # methods that move the topology during training


@dataclass
class SparseSpec:
    """Every sparse setting (see the module docstring for which apply to which method).

    The defaults are a config's (``dense``); :func:`sparsediff.sparsify` called with keywords only starts
    from :data:`SPARSIFY_DEFAULTS` instead (``rigl`` at 90 % sparsity).

    Attributes:
        method: one of :data:`METHODS`.
        sparsity: global fraction of zeros over the target weights, in [0, 1).
        distribution: how the sparsity is spread over layers: ``uniform``, ``er`` or ``erk``.
        prune_ratio: fraction of each layer's active weights moved at the first update, in (0, 1].
        decay: ``cosine`` or ``constant`` decay of the prune ratio.
        update_every: optimiser steps between topology updates.
        end_fraction: updates stop at ``end_fraction * total_steps`` when ``end_step`` is not set.
        end_step: last step with a topology update; ``"never"`` keeps updating (constant decay only).
        include / exclude: name patterns (globs, or regexes prefixed ``re:``) selecting target weights.
        seed: seeds the initial masks and MagRan's growth.
        erk_power: exponent on the ER/ERK raw densities (1.0 is the published rule; 0 gives uniform).
        rescale_init: divide the active initial weights by ``sqrt(density)`` (keeps the output variance).
        backend: how the sparse weights train: ``dense`` (a dense tensor times a mask, torch's kernels) or
            ``sparse`` (compact layers: the non-zeros only, on sparse kernels; static, rigl and magran).
        kernels: with ``backend: sparse``, how each layer chooses sparse or dense kernels: ``auto`` (a
            density rule), ``measure`` (a timed forward and backward at its first call), ``sparse`` or
            ``dense``.
        nm: the N:M pattern (``srste`` without ``progressive``, and ``oneshot``).
        srste_lambda: SR-STE decay of the pruned weights in the backward pass (0 is the plain STE).
        progressive: N:M schedule ``["7:8@0", "4:8@1000", "2:4@2000"]``; when set, ``nm`` is not used
            by the engine (it names the final pattern in a run config).
        nm_incompatible: a target whose input size is not a multiple of M is kept ``dense`` or rejected
            (``error``).
    """

    method: str = "dense"
    sparsity: float = 0.0
    distribution: str = "erk"
    prune_ratio: float = 0.3
    decay: str = "cosine"
    update_every: int = 100
    end_fraction: float = 0.75
    end_step: int | str | None = None
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    seed: int = 0
    erk_power: float = 1.0
    rescale_init: bool = False
    backend: str = "dense"
    kernels: str = "auto"
    # N:M sparsity (methods srste, oneshot)
    nm: str = DEFAULT_NM
    srste_lambda: float = DEFAULT_SRSTE_LAMBDA
    progressive: list[str] = field(default_factory=list)
    nm_incompatible: str = "dense"

    @property
    def sparse_method(self) -> SparseMethod:
        """The registered :class:`~sparsediff.sparse.methods.SparseMethod` of ``method``."""
        return get_method(self.method)

    @property
    def dynamic(self) -> bool:
        """Whether the topology moves during training (RigL, MagRan)."""
        return self.sparse_method.dynamic

    @property
    def structured(self) -> bool:
        """Whether the method makes N:M masks (the :class:`NMSparseEngine`)."""
        return self.sparse_method.structured

    def final_nm_pattern(self) -> str | None:
        """The N:M pattern an N:M run ends with (the last progressive stage, else ``nm``); None otherwise."""
        if not self.structured:
            return None
        if self.progressive:
            return str(parse_progressive(self.progressive)[-1][1])
        return str(parse_nm(self.nm))

    def replace(self, **changes: Any) -> SparseSpec:
        """A copy with ``changes`` applied (lists are copied, so the copies share nothing)."""
        out = dataclasses.replace(self, **changes)
        for name in ("include", "exclude", "progressive"):
            setattr(out, name, list(getattr(out, name)))
        return out

    def for_engine(self) -> SparseSpec:
        """A copy keeping the fields the method's engine uses, the others at their defaults (so two
        engines that behave the same have equal specs and save equal states)."""
        used = self.sparse_method.fields(tuple(f.name for f in dataclasses.fields(self)))
        return SparseSpec(**{name: copy.copy(getattr(self, name)) for name in used})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self, where: str | None = "sparse", *, need_sparsity: bool = True) -> None:
        """Check every setting the method uses; raise :class:`ConfigError` naming the field.

        Args:
            where: prefix of the field names in messages (``"sparse"`` gives ``sparse.method: ...``, a
                config's loader passes ``"<file>.sparse"``); ``None`` gives bare messages.
            need_sparsity: a static or dynamic method needs a sparsity > 0 (off for engines built
                directly, where a 0 sparsity keeps every weight).
        """

        def fail(name: str | None, message: str) -> None:
            if where is None:
                raise ConfigError(message)
            raise ConfigError(f"{where}.{name}: {message}" if name else f"{where}: {message}")

        def check(name: str, check_fn, *args: Any) -> None:
            try:
                check_fn(*args)
            except ConfigError as e:
                fail(name, str(e))

        try:
            method = get_method(self.method)
        except ConfigError as e:
            fail("method", str(e))
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(p, str) for p in value):
                fail(name, f"expected a list of layer patterns, got {value!r}")
        if method.structured:
            check("nm", parse_nm, self.nm)
            if method.has_engine and self.progressive:  # a schedule of patterns is for training
                check("progressive", parse_progressive, self.progressive)
            lam = self.srste_lambda
            if (
                isinstance(lam, bool)
                or not isinstance(lam, (int, float))
                or not math.isfinite(lam)
                or lam < 0
            ):
                fail("srste_lambda", f"srste_lambda must be a finite number >= 0, got {lam!r}")
            check("nm_incompatible", check_policy, self.nm_incompatible)
            if self.backend != "dense":
                fail(
                    "backend",
                    f"method {self.method!r} recomputes its N:M masks from the dense weights on every forward "
                    "pass, so it trains dense tensors: use backend 'dense'",
                )
            return
        check("sparsity", check_sparsity, self.sparsity)
        if self.distribution not in DISTRIBUTIONS:
            fail(
                "distribution",
                f"unknown distribution {self.distribution!r}; choose one of {', '.join(DISTRIBUTIONS)}",
            )
        if self.backend not in BACKENDS:
            fail("backend", f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if self.kernels not in POLICIES:
            fail("kernels", f"unknown kernel policy {self.kernels!r}; choose one of {', '.join(POLICIES)}")
        if self.backend == "sparse" and not method.masked:
            fail("backend", f"backend 'sparse' trains sparse weights; method {self.method!r} has none")
        p = self.erk_power
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p):
            fail("erk_power", f"erk_power must be a finite number, got {p!r}")
        if self.decay not in DECAYS:
            fail("decay", f"unknown prune-ratio decay {self.decay!r}; choose one of {', '.join(DECAYS)}")
        r = self.prune_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 < r <= 1.0:
            fail("prune_ratio", f"prune ratio must be in (0, 1], got {r!r}")
        if method.dynamic:
            u = self.update_every
            if isinstance(u, bool) or not isinstance(u, int) or u < 1:
                fail("update_every", f"update_every must be a positive whole number of steps, got {u!r}")
            e = self.end_step
            if e is not None and e != NEVER and (isinstance(e, bool) or not isinstance(e, int) or e < 0):
                fail(
                    "end_step", f"end_step must be a non-negative whole number of steps or 'never', got {e!r}"
                )
            f = self.end_fraction
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < f <= 1.0:
                fail("end_fraction", f"end_fraction must be in (0, 1], got {f!r}")
        if need_sparsity and method.masked and self.sparsity == 0.0:
            fail(
                None,
                f"method {self.method} needs --sparsity (sparse.sparsity) > 0; "
                f"the config has {self.sparsity}",
            )


# What ``sparsify(model, optimizer, **keywords)`` starts from: a sparse method, unlike a config's default.
SPARSIFY_DEFAULTS = SparseSpec(method="rigl", sparsity=0.9)
