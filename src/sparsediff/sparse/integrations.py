"""The engine inside loops built on accelerate and diffusers: checkpoints, clipping and EMA copies.

A user's loop keeps more than the model and the optimiser, and each of those parts can lose the sparse
topology without a sound. This module closes each gap (``engine.attach_accelerator(acc)`` and
``engine.attach_ema(ema)`` use them, and ``sparsify(..., accelerator=acc, ema=ema)`` calls both):

- :func:`hook_accelerator` registers the engine for accelerate's checkpoints
  (``accelerator.register_for_checkpointing``), so ``save_state`` / ``load_state`` carry its masks, step
  count and update schedule exactly, and makes ``accelerator.clip_grad_norm_`` clip the norm of the
  sparse gradient (it masks the gradients first, on the steps that synchronise gradients);
- :class:`EMATargets` finds an EMA copy's tensors for the engine's target weights (diffusers'
  ``EMAModel``, torch's ``AveragedModel`` or a plain copy of the model) and wraps its update, so
  ``engine.attach_ema(ema)`` can keep it exactly as sparse as the model.

Only duck typing here: nothing from accelerate or diffusers is imported, and the engine is any object
with ``mask_gradients()``, ``state_dict()`` and ``load_state_dict()``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .targets import unwrap_model

_ENGINES_ATTR = "sparsediff_engines"  # set on the clip wrapper: the engines whose gradients it masks


# ---------------------------------------------------------------------------------------------- accelerate


def hook_accelerator(
    engine: Any, accelerator: Any, *, checkpoint: bool = True, clip: bool = True
) -> Callable[[], None]:
    """Make an accelerate training loop keep ``engine``; returns the function that undoes the clipping part.

    ``engine.attach_accelerator(acc)`` (and ``sparsify(..., accelerator=acc)``) call it. ``checkpoint``
    registers the engine with ``accelerator.register_for_checkpointing`` (accelerate cannot undo that);
    ``clip`` wraps ``accelerator.clip_grad_norm_`` so that it first masks the gradients of every engine
    hooked to this accelerator, on the steps where ``accelerator.sync_gradients`` is True (once the
    gradient is complete). Hooking the same engine twice does nothing more.
    """
    if not hasattr(accelerator, "register_for_checkpointing") or not hasattr(accelerator, "clip_grad_norm_"):
        raise ConfigError(f"accelerator= takes an accelerate.Accelerator, got {type(accelerator).__name__}")
    engines: list[Any] | None = getattr(accelerator.clip_grad_norm_, _ENGINES_ATTR, None)
    if engines is not None and any(e is engine for e in engines):
        return lambda: None  # hooked already
    if checkpoint:
        accelerator.register_for_checkpointing(engine)
    if not clip:
        return lambda: None
    if engines is None:
        engines = []
        accelerator.clip_grad_norm_ = _sparse_clip(accelerator, accelerator.clip_grad_norm_, engines)
    engines.append(engine)

    def undo() -> None:
        engines[:] = [e for e in engines if e is not engine]

    return undo


def _sparse_clip(accelerator: Any, original: Callable[..., Any], engines: list[Any]) -> Callable[..., Any]:
    def clip_grad_norm_(parameters: Iterable[torch.Tensor] | torch.Tensor, max_norm: float, norm_type=2):
        # A partial (accumulating) gradient is not the one the optimiser steps with: leave it alone.
        if accelerator.sync_gradients:
            for engine in list(engines):
                engine.mask_gradients()
        return original(parameters, max_norm, norm_type)

    clip_grad_norm_.__doc__ = (
        "accelerate's clip_grad_norm_, after masking the gradients of the sparse engines attached to this "
        "accelerator (engine.attach_accelerator): the norm is the sparse gradient's."
    )
    setattr(clip_grad_norm_, _ENGINES_ATTR, engines)
    return clip_grad_norm_


# ---------------------------------------------------------------------------------------------- EMA copies


class EMATargets:
    """The tensors of an EMA copy that hold the engine's target weights, found again at every use.

    Three kinds of EMA are understood:

    - an object with ``shadow_params`` (diffusers' ``EMAModel``): its shadow tensors line up with the
      parameters it was built from, ``parameters`` (default: every parameter of the engine's model, in
      order, which is what ``EMAModel(model.parameters())`` tracks); its ``step`` is the update;
    - torch's ``AveragedModel``: the weights of its ``module`` by name; ``update_parameters`` is the
      update;
    - any other ``nn.Module`` (a copy of the model updated by your own code): its weights by name; it
      has no update to wrap, so mask it with ``engine.mask_ema(ema)`` after your update.

    The tensors are looked up at every use, so ``ema.to(device)`` and ``ema.load_state_dict`` (which
    replace diffusers' shadow tensors) are followed.
    """

    def __init__(
        self,
        ema: Any,
        targets: Mapping[str, nn.Parameter],
        model: nn.Module,
        parameters: Iterable[torch.Tensor] | None = None,
    ):
        self.ema = ema
        self.names = list(targets)
        self._shapes = {n: tuple(p.shape) for n, p in targets.items()}
        self._index: dict[str, int] | None = None
        self._module: nn.Module | None = None
        if hasattr(ema, "shadow_params"):
            params = list(parameters) if parameters is not None else list(unwrap_model(model).parameters())
            if len(ema.shadow_params) != len(params):
                raise ConfigError(
                    f"the EMA tracks {len(ema.shadow_params)} tensors but {len(params)} parameters were "
                    "given to match them with; pass parameters= the iterable the EMA was built from"
                )
            position = {id(p): i for i, p in enumerate(params)}
            missing = [n for n, p in targets.items() if id(p) not in position]
            if missing:
                raise ConfigError(
                    f"the EMA does not track the sparsified weight(s) {', '.join(missing[:3])}; pass "
                    "parameters= the iterable the EMA was built from (it must contain them)"
                )
            self._index = {n: position[id(p)] for n, p in targets.items()}
            self.kind = "shadow_params"
        elif isinstance(ema, nn.Module):
            inner = getattr(ema, "module", None)
            averaged = callable(getattr(ema, "update_parameters", None)) and isinstance(inner, nn.Module)
            self._module = unwrap_model(inner if averaged else ema)
            self.kind = "averaged_model" if averaged else "module"
        else:
            raise ConfigError(
                f"cannot find the weights of an EMA of type {type(ema).__name__}: give a diffusers EMAModel "
                "(shadow_params), a torch.optim.swa_utils.AveragedModel or an nn.Module copy of the model"
            )
        self.tensors()  # check now: every target found, with its shape

    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        """``[(target name, EMA tensor)]`` in the engine's order."""
        if self._index is not None:
            shadows = self.ema.shadow_params
            out = [(n, shadows[i]) for n, i in self._index.items()]
        else:
            params = dict(self._module.named_parameters())
            missing = [n for n in self.names if n not in params]
            if missing:
                raise ConfigError(
                    f"the EMA copy has no weight named {missing[0]!r} (of {len(missing)} sparsified "
                    "weights); it must be a copy of the sparsified model"
                )
            out = [(n, params[n]) for n in self.names]
        for name, t in out:
            if tuple(t.shape) != self._shapes[name]:
                raise ConfigError(
                    f"the EMA's tensor for {name!r} has shape {tuple(t.shape)}, the weight "
                    f"{self._shapes[name]}; pass parameters= the iterable the EMA was built from"
                )
        return out

    def wrap_update(self, after: Callable[[], None]) -> Callable[[], None]:
        """Make the EMA's update call ``after()`` once it is done; returns the function that undoes it."""
        attr = {"shadow_params": "step", "averaged_model": "update_parameters"}.get(self.kind)
        if attr is None:
            return lambda: None
        ema = self.ema
        had_own = attr in vars(ema)
        original = getattr(ema, attr)

        def update(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            after()
            return result

        update.__doc__ = getattr(original, "__doc__", None)
        setattr(ema, attr, update)

        def undo() -> None:
            if vars(ema).get(attr) is update:
                if had_own:
                    setattr(ema, attr, original)
                else:
                    delattr(ema, attr)

        return undo
