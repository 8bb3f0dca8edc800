"""Growth operators: width (HyperCloning), depth (identity / G_stack), MoE upcycling.

Each operator returns a new model and leaves its source untouched (no shared storage).
One table of parameter roles (``roles.py``) drives every operator; an adapter
(``adapters.py``) maps an architecture's parameter names to those roles.
"""

from .adapters import FamilyAdapter, get_adapter, register_adapter, register_family, supported_families
from .families import FAMILIES, QUIRKS, Family, Fused
from .bilateral import deepen_widened, scale_bilaterally
from .depth import default_positions, grow_depth
from .moe import DEFAULT_ROUTER_STD, upcycle_to_moe, upcycling_pairs
from .masks import GrowthFreeze, freeze_for_growth, growth_param_groups, trainable_mask
from .optimizer import transfer_adam_state
from .records import GrowthRecord, Source
from .saving import load_grown, load_growth_records, save_grown
from .roles import ROLE_RULES, ParamRole, Role, RoleRule
from .width import grow_width, hyperclone_weight

__all__ = [
    "DEFAULT_ROUTER_STD",
    "FAMILIES",
    "Family",
    "FamilyAdapter",
    "Fused",
    "QUIRKS",
    "GrowthFreeze",
    "GrowthRecord",
    "ParamRole",
    "ROLE_RULES",
    "Role",
    "RoleRule",
    "Source",
    "deepen_widened",
    "default_positions",
    "freeze_for_growth",
    "get_adapter",
    "grow_depth",
    "grow_width",
    "growth_param_groups",
    "hyperclone_weight",
    "load_grown",
    "load_growth_records",
    "register_adapter",
    "register_family",
    "supported_families",
    "upcycling_pairs",
    "save_grown",
    "scale_bilaterally",
    "trainable_mask",
    "transfer_adam_state",
    "upcycle_to_moe",
]
