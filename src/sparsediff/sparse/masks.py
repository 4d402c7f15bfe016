"""Initial masks of the unstructured engine: seeded random ones, given ones, or the zeros of the weights.

``sparsify(model, optimizer, ..., masks=...)`` starts from masks other than random ones:
``masks="weights"`` keeps the non-zero positions of weights that are already sparse (a model exported as
a diffusers folder and loaded back, say), and a mapping ``{layer name: bool mask}`` restores masks saved
beside such a model. Either way each layer keeps exactly the budget its settings give it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import ConfigError
from .base import derive_seed


def random_mask(shape: tuple[int, ...], budget: int, seed: int, name: str, keep: torch.Tensor | None = None):
    """A bool mask of ``shape`` keeping ``budget`` positions chosen at random (seeded by ``(seed, name)``).

    The draw uses a CPU generator, so the mask is the same whatever the device, on every rank.
    ``keep`` (flat bool) positions are kept first; the rest of the budget is drawn among the others.
    """
    numel = int(torch.Size(shape).numel())
    if budget >= numel:
        return torch.ones(shape, dtype=torch.bool)
    g = torch.Generator(device="cpu")
    g.manual_seed(derive_seed(seed, name, "init"))
    scores = torch.rand(numel, generator=g)
    if keep is not None:
        scores.masked_fill_(keep, 2.0)  # above every draw in [0, 1)
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[torch.topk(scores, budget, sorted=False).indices] = True
    return mask.view(shape)


def masks_from_weights(
    params: Mapping[str, torch.Tensor], budgets: Mapping[str, int], seed: int, settings: str
) -> dict[str, torch.Tensor]:
    """Masks keeping every non-zero weight, topped up to each layer's budget with positions where it is 0.

    Weights that are active but exactly 0 (grown by the last topology update) leave a layer's count
    short of its budget; the remaining positions are drawn among the zeros as initial masks are, which
    changes nothing in the model. ``settings`` names the sparse settings in error messages.

    Raises:
        ConfigError: a layer has more non-zero weights than its budget, or is on the meta device.
    """
    out = {}
    for name, p in params.items():
        if p.is_meta:
            raise ConfigError(f"masks='weights' needs the weights' values; {name!r} is on the meta device")
        nonzero = p.detach().reshape(-1).ne(0).cpu()
        count, budget = int(nonzero.count_nonzero()), budgets[name]
        if count > budget:
            raise ConfigError(
                f"masks='weights': layer {name!r} has {count} non-zero weights, more than the {budget} that "
                f"{settings} give it; give the settings the model was trained with (an exported folder's "
                "sparsediff.json names them)"
            )
        out[name] = random_mask(tuple(p.shape), budget, seed, name, keep=nonzero)
    return out


def mask_mismatch(masks: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor]) -> str | None:
    """What is wrong with the first mask that does not fit ``params`` (name -> weight), or None.

    A mask must name a parameter and have its shape; callers raise their own error type with this text.
    """
    for name, mask in masks.items():
        if name not in params:
            return f"mask for {name!r} matches no parameter of the model"
        if tuple(mask.shape) != tuple(params[name].shape):
            return f"mask for {name!r} has shape {tuple(mask.shape)} but the weight has {tuple(params[name].shape)}"
    return None


def check_given_masks(
    masks: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, ...]],
    budgets: Mapping[str, int],
    settings: str,
) -> dict[str, torch.Tensor]:
    """``masks`` as bool CPU tensors, one per layer of ``shapes``, each keeping exactly its budget.

    Raises:
        ConfigError: a layer without a mask, a mask for an unknown layer, or a mask of another shape or
            another number of active positions (the layer is named).
    """
    missing = [n for n in shapes if n not in masks]
    unknown = [n for n in masks if n not in shapes]
    if missing or unknown:
        parts = [f"no mask for {', '.join(missing[:3])}"] if missing else []
        parts += [f"masks for unknown layer(s) {', '.join(unknown[:3])}"] if unknown else []
        raise ConfigError("masks= does not fit this model's sparsified weights: " + "; ".join(parts))
    out = {}
    for name, shape in shapes.items():
        mask = torch.as_tensor(masks[name]).detach().to("cpu").bool()
        if tuple(mask.shape) != tuple(shape):
            raise ConfigError(
                f"masks=: the mask of {name!r} has shape {tuple(mask.shape)}, the weight {shape}"
            )
        active = int(mask.count_nonzero())
        if active != budgets[name]:
            raise ConfigError(
                f"masks=: the mask of {name!r} keeps {active} weights but {settings} give it a budget of "
                f"{budgets[name]}; give the settings the masks were made with"
            )
        out[name] = mask
    return out
