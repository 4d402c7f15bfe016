"""The sparse methods, one small class each, and the one registry everything else asks.

A method says what it is and what it needs; the engines, the spec, ``sparsify``, the command line and the
reports ask it instead of comparing names::

    method = get_method("rigl")
    method.dynamic              # True: the topology moves during training
    method.needs_dense_grads    # True: its growth reads the dense gradient on update steps
    method.grow_score(...)      # how the positions to grow are scored

=========  ==========  =======  ==========  ==========  ===================================================
method     family      masks    dynamic     has engine  growth
=========  ==========  =======  ==========  ==========  ===================================================
dense      unstruct.   no       no          yes         (every weight trains)
static     unstruct.   yes      no          yes         (random mask fixed at the start)
rigl       unstruct.   yes      yes         yes         largest dense-gradient magnitude (needs dense grads)
magran     unstruct.   yes      yes         yes         uniformly at random (a seeded generator)
srste      N:M         yes      pattern     yes         (N:M masks recomputed from the weights each forward)
oneshot    N:M         yes      no          no          (magnitude N:M pruning once, without training)
=========  ==========  =======  ==========  ==========  ===================================================

Adding a method is one class here (overriding only what differs, as RigL and MagRan override the grow
score) and one line in :data:`REGISTRY`; nothing else lists method names.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..errors import ConfigError

# The settings each family of methods reads (the fields of SparseSpec; see spec.py).
COMMON_FIELDS = ("method", "include", "exclude")
NM_FIELDS = ("nm", "srste_lambda", "progressive", "nm_incompatible")
SCHEDULE_FIELDS = ("prune_ratio", "decay", "update_every", "end_step", "seed")  # kept on resume


class SparseMethod:
    """What one sparse method is and needs. Subclasses set the class attributes and override
    :meth:`grow_score` or :meth:`training_flops` where they differ."""

    name: ClassVar[str]
    help: ClassVar[str]
    structured: ClassVar[bool] = False  # N:M masks (the NMSparseEngine) rather than unstructured ones
    masked: ClassVar[bool] = True  # some weights are held at 0 (False for dense: every weight trains)
    dynamic: ClassVar[bool] = False  # the topology moves during training (drop and grow)
    has_engine: ClassVar[bool] = True  # sparsify() builds an engine for it (it trains)
    needs_dense_grads: ClassVar[bool] = False  # growth reads the dense gradient on update steps
    random_growth: ClassVar[bool] = False  # growth draws from a seeded generator

    @property
    def family(self) -> str:
        return "nm" if self.structured else "unstructured"

    def fields(self, all_fields: tuple[str, ...]) -> tuple[str, ...]:
        """The spec fields this method's engine uses (the others stay at their defaults in its state)."""
        if self.structured:
            return NM_FIELDS + COMMON_FIELDS
        return tuple(f for f in all_fields if f not in NM_FIELDS)

    def grow_score(
        self, numel: int, dense_grad: torch.Tensor | None, seed: int, device: torch.device
    ) -> torch.Tensor:
        """A float32 score per position of a layer (flat); growth takes the highest among those not kept."""
        raise ConfigError(f"method {self.name!r} grows no weights")

    def training_flops(self, flops_dense: float, flops_sparse: float, update_every: int) -> float:
        """Training FLOPs of one optimiser step (forward FLOPs of its batch given), RigL accounting:
        forward, input gradient and weight gradient on the sparse weights."""
        return 3.0 * (flops_sparse if self.masked else flops_dense)

    def engine_method(self) -> str:
        """The method whose engine holds this method's masks in a trained model (itself, when it has one)."""
        return self.name

    def __repr__(self) -> str:
        return f"<sparse method {self.name}>"


class Dense(SparseMethod):
    name = "dense"
    help = "no masks: every weight trains (the baseline)"
    masked = False


class Static(SparseMethod):
    name = "static"
    help = "a random mask fixed at the start"


class _DropAndGrow(SparseMethod):
    """Drop the active weights of smallest magnitude, grow as many elsewhere (RigL, MagRan)."""

    dynamic = True


class RigL(_DropAndGrow):
    name = "rigl"
    help = "drop by magnitude, grow where the dense gradient is largest"
    needs_dense_grads = True

    def grow_score(self, numel, dense_grad, seed, device):
        if dense_grad is None:
            raise RuntimeError("RigL growth needs the dense gradient of the update step")
        return torch.nan_to_num(dense_grad.reshape(-1).float().abs(), nan=0.0, posinf=0.0)

    def training_flops(self, flops_dense, flops_sparse, update_every):
        # every update_every + 1 steps: update_every sparse steps and one that also computes the dense
        # weight gradient (forward and input gradient sparse, weight gradient dense)
        dt = update_every
        return (3.0 * flops_sparse * dt + 2.0 * flops_sparse + flops_dense) / (dt + 1)


class MagRan(_DropAndGrow):
    name = "magran"
    help = "drop by magnitude, grow at random"
    random_growth = True

    def grow_score(self, numel, dense_grad, seed, device):
        g = torch.Generator(device=device)
        g.manual_seed(seed)
        return torch.rand(numel, generator=g, device=device)


class SRSTE(SparseMethod):
    name = "srste"
    help = "N:M masks from the weights on every forward pass, trained with SR-STE"
    structured = True

    def training_flops(self, flops_dense, flops_sparse, update_every):
        # SR-STE trains the dense weights (the mask is recomputed from them): dense products throughout
        return 3.0 * flops_dense


class OneShot(SparseMethod):
    name = "oneshot"
    help = "magnitude N:M pruning once, without training"
    structured = True
    has_engine = False

    def engine_method(self) -> str:
        return "srste"  # its masks are the N:M masks of the weights, as the SR-STE engine computes them


# The order of choices in help texts and messages (reports sort methods by their own rule).
REGISTRY: dict[str, SparseMethod] = {
    m.name: m for m in (Dense(), Static(), RigL(), MagRan(), SRSTE(), OneShot())
}


def get_method(name: str) -> SparseMethod:
    """The registered method called ``name``; a :class:`ConfigError` listing the choices otherwise."""
    method = REGISTRY.get(name) if isinstance(name, str) else None
    if method is None:
        raise ConfigError(f"unknown sparse method {name!r}; choose one of {', '.join(REGISTRY)}")
    return method


def method_names(**traits: bool) -> tuple[str, ...]:
    """Names of the registered methods with the given traits, in registry order, e.g.
    ``method_names(structured=False)`` or ``method_names(dynamic=True)``."""
    unknown = [t for t in traits if not hasattr(SparseMethod, t)]
    if unknown:
        raise TypeError(f"unknown method trait {unknown[0]!r}")
    return tuple(n for n, m in REGISTRY.items() if all(getattr(m, t) == v for t, v in traits.items()))


def is_dense(name: str) -> bool:
    """Whether ``name`` trains every weight (no masks); unknown names are not dense."""
    method = REGISTRY.get(name)
    return method is not None and not method.masked
