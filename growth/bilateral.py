"""Bilateral growth: width (HyperCloning), then depth, in one call (or two)."""

from __future__ import annotations

from torch import nn

from .depth import check_depth, deepen
from .width import check_width_args, widen


def scale_bilaterally(
    model: nn.Module,
    scale_factor: int = 2,
    extra_layers: int = 4,
    noise_std: float = 1e-5,
    *,
    depth_mode: str = "identity",
    positions: list[int] | None = None,
    stack_scale: float | None = None,
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
        stack_scale: ``"stack"`` only: the stacked copies' residual writers times this, in
            [0, 1] (default 1; 0: identity layers in G_stack's places; see ``grow_depth``).
        noise: ``"zero_sum"`` or ``"independent"``.
        seed: noise seed.

    Returns:
        The grown model; ``growth_records`` holds the width record, then the depth record.
    """
    # Every argument is checked before the first (large) allocation.
    scale, noise_std, seed = check_width_args(scale_factor, noise_std, noise, seed)
    # Width growth keeps the layer count, so the depth arguments are checked against the source.
    positions, stack_scale = check_depth(model, extra_layers, depth_mode, positions, stack_scale,
                                         mode_name="depth_mode", what="bilateral growth")
    wide = widen(model, scale, noise_std, noise, seed)
    return _deepen_widened(wide, int(extra_layers), depth_mode, positions, stack_scale)


def deepen_widened(
    wide: nn.Module,
    extra_layers: int,
    depth_mode: str = "identity",
    positions: list[int] | None = None,
    stack_scale: float | None = None,
) -> nn.Module:
    """The depth step of :func:`scale_bilaterally`, on a model :func:`grow_width` made (so
    that the widening can be checked alone before a ``"stack"`` step changes the function).

    Returns:
        The deeper model; ``growth_records`` holds ``wide``'s width record, then the depth
        record, as :func:`scale_bilaterally` leaves them (what ``transfer_adam_state`` and
        the growth masks read).
    """
    positions, stack_scale = check_depth(wide, extra_layers, depth_mode, positions, stack_scale,
                                         mode_name="depth_mode", what="bilateral growth")
    return _deepen_widened(wide, int(extra_layers), depth_mode, positions, stack_scale)


def _deepen_widened(wide: nn.Module, extra_layers: int, depth_mode: str,
                    positions: list[int] | None, stack_scale: float) -> nn.Module:
    """:func:`deepen_widened` on arguments already checked."""
    grown = deepen(wide, extra_layers, depth_mode, positions, stack_scale)
    # growth_records: this call's (width, then depth); the history has both already
    grown.growth_records = list(wide.growth_records) + list(grown.growth_records)
    return grown
