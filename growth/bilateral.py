"""Bilateral growth: width (HyperCloning), then depth, in one call."""

from __future__ import annotations

from torch import nn

from .adapters import get_adapter
from .depth import check_depth_args, deepen
from .width import check_width_args, widen


def scale_bilaterally(
    model: nn.Module,
    scale_factor: int = 2,
    extra_layers: int = 4,
    noise_std: float = 1e-5,
    *,
    depth_mode: str = "identity",
    positions: list[int] | None = None,
    noise: str = "zero_sum",
    seed: int = 0,
) -> nn.Module:
    """Grow ``model`` to ``scale_factor`` x its width, then add ``extra_layers`` layers.

    Function-preserving with the defaults (zero-sum noise, identity layers); with
    ``depth_mode="stack"`` the depth step changes the function by design.

    Args:
        model: the source model (left untouched).
        scale_factor: width multiple, a whole number >= 2.
        extra_layers: layers to add after widening (>= 0).
        noise_std: zero-sum symmetry-breaking noise of the width step.
        depth_mode: ``"identity"`` or ``"stack"`` (see ``grow_depth``).
        positions: where the new layers go (see ``grow_depth``).
        noise: ``"zero_sum"`` or ``"independent"``.
        seed: noise seed.

    Returns:
        The grown model; ``growth_records`` holds the width record, then the depth record.
    """
    # Every argument is checked before the first (large) allocation.
    scale, noise_std, seed = check_width_args(scale_factor, noise_std, noise, seed)
    # Width growth keeps the layer count, so the depth arguments are checked against the source.
    n_layers = get_adapter(model, "bilateral growth").n_layers(model)
    positions = check_depth_args(extra_layers, depth_mode, positions, n_layers, mode_name="depth_mode")
    wide = widen(model, scale, noise_std, noise, seed)
    width_records = wide.growth_records
    grown = deepen(wide, int(extra_layers), depth_mode, positions)
    grown.growth_records = width_records + grown.growth_records  # the history has both already
    return grown
