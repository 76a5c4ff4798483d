"""Parameter classification and param-group building (decay / no-decay, transformers' semantics).

``classify`` computes the facts about each parameter, ``policies`` decides weight decay from them,
``rules`` parses and matches ``param_rules``, ``layers`` assigns layer ids for layer-wise lr decay,
``groups`` assembles the param groups of the contract in docs/architecture.md.
"""

from __future__ import annotations

from optsched.params.classify import (
    NORM_LAYER_TYPES,
    ParamInfo,
    classify_parameters,
    is_bias_name,
    is_norm_module,
    is_norm_name,
    unwrap_compiled,
)
from optsched.params.groups import (
    DECAY_GROUP,
    NO_DECAY_GROUP,
    assemble_groups,
    build_param_groups,
    freeze_parameters,
    get_decay_parameter_names,
    resolve_weight_decay,
)
from optsched.params.layers import (
    BLOCK_CONTAINERS,
    LayerIdFn,
    assign_layer_ids,
    get_layer_ids,
    infer_block_index,
    layer_lr_scale,
    resolve_layer_id_fn,
)
from optsched.params.policies import (
    DecayPolicy,
    hf_decay_policy,
    is_embedding_like,
    list_decay_policies,
    ndim_decay_policy,
    resolve_decay_policy,
)
from optsched.params.rules import (
    RULE_KEYS,
    ParamRule,
    match_rules,
    normalize_param_rules,
    parse_param_rules,
)

__all__ = [
    "BLOCK_CONTAINERS",
    "DECAY_GROUP",
    "NORM_LAYER_TYPES",
    "NO_DECAY_GROUP",
    "DecayPolicy",
    "LayerIdFn",
    "ParamInfo",
    "ParamRule",
    "RULE_KEYS",
    "assemble_groups",
    "assign_layer_ids",
    "build_param_groups",
    "classify_parameters",
    "freeze_parameters",
    "get_decay_parameter_names",
    "get_layer_ids",
    "hf_decay_policy",
    "infer_block_index",
    "is_bias_name",
    "is_embedding_like",
    "is_norm_module",
    "is_norm_name",
    "layer_lr_scale",
    "list_decay_policies",
    "match_rules",
    "ndim_decay_policy",
    "normalize_param_rules",
    "parse_param_rules",
    "resolve_decay_policy",
    "resolve_layer_id_fn",
    "resolve_weight_decay",
    "unwrap_compiled",
]
