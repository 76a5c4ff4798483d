"""The built-in optimizer names: every transformers 5.23 name plus torch's own by lower-case name.

Each entry reproduces the class and keyword arguments of transformers'
``Trainer.get_optimizer_cls_and_kwargs`` (``trainer_optimizer.py``) for that name; where this
catalog differs on purpose the entry says so. Names that cannot run on a CPU-only machine:

* ``adamw_torch_xla`` (torch_xla), ``adamw_torch_npu_fused`` (torch_npu), ``adamw_anyprecision``
  (torchdistx): their packages target other devices / are not on PyPI for CPU;
* ``adalomo``: lomo-optim allocates its state with ``.cuda()``;
* ``galore_adamw_8bit(_layerwise)``: galore-torch's 8-bit AdamW calls ``torch.cuda.synchronize()``;
* ``paged_*``: bitsandbytes pages only on CUDA and falls back to unpaged state (with a warning) on CPU.
"""

from __future__ import annotations

from functools import partial

import torch

from optsched.optim.adalomo import with_adalomo_state
from optsched.optim.grokadamw import with_standard_state
from optsched.optim.lowrank import build_lowrank
from optsched.optim.schedulefree import build_schedule_free
from optsched.optim.stable_adamw import with_triton_resolved
from optsched.optim.spec import OptimArg, OptimizerSpec, register_optimizer

__all__ = ["BUILTIN_NAMES", "TRANSFORMERS_NAMES"]

ADAM = ("lr", "betas", "eps")


def _register(spec: OptimizerSpec) -> None:
    register_optimizer(spec, overwrite=True)  # idempotent on re-import (importlib.reload in tests)


def _arg(name: str, type: str = "float", default=None, **kw) -> OptimArg:
    return OptimArg(name, type, **({} if default is None else {"default": default}), **kw)


# ---------------------------------------------------------------------------------------------
# torch.optim
# ---------------------------------------------------------------------------------------------
_AMSGRAD = (_arg("amsgrad", "bool"),)
for _name, _fixed in (("adamw_torch", {}), ("adamw_torch_fused", {"fused": True})):
    _register(OptimizerSpec(_name, torch.optim.AdamW, common=ADAM, fixed=_fixed, optim_args=_AMSGRAD,
                            description="torch.optim.AdamW" + (" (fused kernel)" if _fixed else "")))

_register(OptimizerSpec(
    "sgd", torch.optim.SGD, common=("lr", "momentum"),
    optim_args=(_arg("momentum"), _arg("dampening"), _arg("weight_decay"), _arg("nesterov", "bool")),
    description="torch.optim.SGD; an explicitly set adam_beta1 is its momentum unless optim_args has one",
))
_register(OptimizerSpec(
    "adagrad", torch.optim.Adagrad,
    optim_args=(_arg("lr_decay"), _arg("weight_decay"), _arg("eps")), description="torch.optim.Adagrad",
))
_register(OptimizerSpec(
    "rmsprop", torch.optim.RMSprop,
    optim_args=(_arg("momentum"), _arg("alpha"), _arg("eps"), _arg("weight_decay"), _arg("centered", "bool")),
    description="torch.optim.RMSprop",
))

# torch's own optimizers by lower-case name (not in transformers): betas/eps from adam_beta1/2 and
# adam_epsilon where the class has them.
for _name, _cls, _common, _extra in (
    ("adam", torch.optim.Adam, ADAM, _AMSGRAD),
    ("adamw", torch.optim.AdamW, ADAM, _AMSGRAD),
    ("nadam", torch.optim.NAdam, ADAM, (_arg("momentum_decay"), _arg("decoupled_weight_decay", "bool"))),
    ("radam", torch.optim.RAdam, ADAM, (_arg("decoupled_weight_decay", "bool"),)),
    ("adamax", torch.optim.Adamax, ADAM, ()),
    ("adadelta", torch.optim.Adadelta, ("lr", "eps"), (_arg("rho"),)),
    ("asgd", torch.optim.ASGD, ("lr",), (_arg("lambd"), _arg("alpha"), _arg("t0"))),
    ("rprop", torch.optim.Rprop, ("lr",), (_arg("etas", "floats"), _arg("step_sizes", "floats"))),
):
    _register(OptimizerSpec(_name, _cls, common=_common, optim_args=_extra,
                            description=f"torch.optim.{_cls.__name__}"))

# ---------------------------------------------------------------------------------------------
# optsched's native Adafactor (transformers' semantics), other devices' AdamW
# ---------------------------------------------------------------------------------------------
_register(OptimizerSpec(
    "adafactor", "optsched.optim.adafactor.Adafactor",
    fixed={"scale_parameter": False, "relative_step": False},
    optim_args=(_arg("clip_threshold"), _arg("decay_rate"), _arg("beta1"), _arg("fused", "bool")),
    description="optsched's Adafactor with a fixed lr (scale_parameter=False, relative_step=False), as HF; "
    "fused=True: a C++ kernel for fp32 CPU matrices",
))
_register(OptimizerSpec("adamw_torch_xla", "torch_xla.amp.syncfree.AdamW", package="torch_xla", common=ADAM,
                        requires_device="xla", description="torch_xla syncfree AdamW (TPU)"))
_register(OptimizerSpec("adamw_torch_npu_fused", "torch_npu.optim.NpuFusedAdamW", package="torch_npu",
                        common=ADAM, requires_device="npu", description="Ascend NPU fused AdamW"))
_register(OptimizerSpec(
    "adamw_anyprecision", "torchdistx.optimizers.AnyPrecisionAdamW", package="torchdistx", common=ADAM,
    optim_args=(
        _arg("use_kahan_summation", "bool", False),
        _arg("momentum_dtype", "dtype", torch.float32),
        _arg("variance_dtype", "dtype", torch.float32),
        _arg("compensation_buffer_dtype", "dtype", torch.bfloat16),
    ),
    description="torchdistx AnyPrecisionAdamW",
))

# ---------------------------------------------------------------------------------------------
# torchao low-bit AdamW
# ---------------------------------------------------------------------------------------------
for _name, _cls_name in (("adamw_torch_4bit", "AdamW4bit"), ("adamw_torch_8bit", "AdamW8bit")):
    _register(OptimizerSpec(
        _name, (f"torchao.optim.{_cls_name}", f"torchao.prototype.low_bit_optim.{_cls_name}"),
        package="torchao", extra="torchao", common=ADAM,
        # HF passes block_size through as a string when given; here it is an int.
        optim_args=(_arg("block_size", "int", 256), _arg("bf16_stochastic_round", "bool", False)),
        description=f"torchao {_cls_name}",
    ))

# ---------------------------------------------------------------------------------------------
# bitsandbytes: a variant is a name plus fixed optim_bits / is_paged
# ---------------------------------------------------------------------------------------------
_BNB_EXTRA = (_arg("min_8bit_size", "int"), _arg("percentile_clipping", "int"))
for _name, _bits, _paged in (
    ("adamw_bnb_8bit", 8, False), ("adamw_8bit", 8, False),
    ("paged_adamw_32bit", 32, True), ("paged_adamw_8bit", 8, True),
):
    _register(OptimizerSpec(_name, "bitsandbytes.optim.AdamW", package="bitsandbytes", extra="bnb", common=ADAM,
                            fixed={"optim_bits": _bits, "is_paged": _paged}, optim_args=_BNB_EXTRA + _AMSGRAD,
                            description=f"bitsandbytes AdamW, {_bits}-bit state{', paged' if _paged else ''}"))
for _name, _bits, _paged in (
    ("lion_32bit", 32, False), ("lion_8bit", 8, False), ("paged_lion_32bit", 32, True), ("paged_lion_8bit", 8, True),
):
    # HF gives Lion betas but not eps (Lion has none).
    _register(OptimizerSpec(_name, "bitsandbytes.optim.Lion", package="bitsandbytes", extra="bnb",
                            common=("lr", "betas"), fixed={"optim_bits": _bits, "is_paged": _paged},
                            optim_args=_BNB_EXTRA,
                            description=f"bitsandbytes Lion, {_bits}-bit state{', paged' if _paged else ''}"))
for _name, _bits in (("rmsprop_bnb", 32), ("rmsprop_bnb_8bit", 8), ("rmsprop_bnb_32bit", 32)):
    # HF forwards optim_args to bnb RMSprop as raw strings; here they are typed. No is_paged (as HF).
    _register(OptimizerSpec(
        _name, "bitsandbytes.optim.RMSprop", package="bitsandbytes", extra="bnb", fixed={"optim_bits": _bits},
        optim_args=(_arg("alpha"), _arg("eps"), _arg("weight_decay"), _arg("momentum"), _arg("centered", "bool"))
        + _BNB_EXTRA,
        description=f"bitsandbytes RMSprop, {_bits}-bit state",
    ))


def _build_ademamix(ctx):
    """AdEMAMix takes three betas: (beta1, beta2) default to adam_beta1/2, beta3 to 0.9999 (as HF)."""
    kwargs = dict(ctx.kwargs)
    beta1 = kwargs.pop("beta1", ctx.args.adam_beta1)
    beta2 = kwargs.pop("beta2", ctx.args.adam_beta2)
    kwargs["betas"] = (beta1, beta2, kwargs.pop("beta3"))
    return ctx.cls, kwargs


for _name, _bits, _paged in (
    ("ademamix", 32, False), ("ademamix_8bit", 8, False),
    ("paged_ademamix_32bit", 32, True), ("paged_ademamix_8bit", 8, True),
):
    _register(OptimizerSpec(
        _name, "bitsandbytes.optim.AdEMAMix", package="bitsandbytes", extra="bnb", common=("lr", "eps"),
        fixed={"optim_bits": _bits, "is_paged": _paged},
        optim_args=(_arg("beta1"), _arg("beta2"), _arg("beta3", default=0.9999), _arg("alpha", default=5.0),
                    _arg("eps"), _arg("t_alpha", "int"), _arg("t_beta3", "int")),
        builder=_build_ademamix,
        description=f"bitsandbytes AdEMAMix, {_bits}-bit state{', paged' if _paged else ''}",
    ))

# ---------------------------------------------------------------------------------------------
# GaLore / APOLLO (low-rank projection of selected linear weights), plain and layer-wise
# ---------------------------------------------------------------------------------------------
_GALORE_ARGS = (_arg("rank", "int", 128), _arg("update_proj_gap", "int", 200), _arg("scale", default=0.25),
                _arg("proj_type", "str", "std"))
_GALORE_KEYS = tuple(a.name for a in _GALORE_ARGS)
for _name, _cls_name, _fixed in (
    ("galore_adamw", "GaLoreAdamW", {}),
    ("galore_adamw_8bit", "GaLoreAdamW8bit", {}),
    ("galore_adafactor", "GaLoreAdafactor", {"scale_parameter": False, "relative_step": False}),
):
    for _layerwise in (False, True):
        # HF gives GaLore only lr (no betas/eps), as here. HF forgets the Adafactor flags in
        # layer-wise mode (so its galore_adafactor_layerwise raises); here both modes get them.
        _register(OptimizerSpec(
            _name + ("_layerwise" if _layerwise else ""), f"galore_torch.{_cls_name}", package="galore-torch",
            extra="galore", fixed=_fixed, optim_args=_GALORE_ARGS, needs_model=True,
            # GaLoreAdamW8bit calls torch.cuda.synchronize() on every step.
            requires_device="cuda" if _cls_name == "GaLoreAdamW8bit" else None,
            builder=partial(build_lowrank, group_keys=_GALORE_KEYS, layerwise=_layerwise),
            description=f"GaLore {_cls_name}{' stepped per parameter from gradient hooks' if _layerwise else ''}",
        ))

_APOLLO_ARGS = (_arg("rank", "int", 128), _arg("proj", "str", "random"), _arg("scale_type", "str", "channel"),
                _arg("update_proj_gap", "int", 200), _arg("scale", default=1.0), _arg("proj_type", "str", "std"))
for _layerwise in (False, True):
    # As HF: betas/eps go into the projected groups only; the other groups keep APOLLO's defaults.
    _register(OptimizerSpec(
        "apollo_adamw" + ("_layerwise" if _layerwise else ""), "apollo_torch.APOLLOAdamW", package="apollo-torch",
        extra="apollo", common=ADAM, optim_args=_APOLLO_ARGS, needs_model=True,
        builder=partial(build_lowrank, group_keys=(*(a.name for a in _APOLLO_ARGS), "betas", "eps"),
                        layerwise=_layerwise),
        description="APOLLO AdamW" + (" stepped per parameter from gradient hooks" if _layerwise else ""),
    ))

# ---------------------------------------------------------------------------------------------
# LOMO, GrokAdamW, schedule-free, StableAdamW
# ---------------------------------------------------------------------------------------------


def _build_lomo(ctx):
    """LOMO fuses the update into backward: it takes the model instead of param groups."""
    return ctx.cls, {**ctx.kwargs, "model": ctx.model}


_register(OptimizerSpec("lomo", "lomo_optim.Lomo", package="lomo-optim", extra="lomo", needs_model=True,
                        builder=_build_lomo, description="LOMO: step inside backward (optimizer.fused_backward)"))


def _build_adalomo(ctx):
    """Upstream AdaLomo (takes the model) with a state dict that round-trips (``optsched.optim.adalomo``)."""
    return with_adalomo_state(ctx.cls), {**ctx.kwargs, "model": ctx.model}


_register(OptimizerSpec("adalomo", "lomo_optim.AdaLomo", package="lomo-optim", extra="lomo", needs_model=True,
                        builder=_build_adalomo, requires_device="cuda",
                        description="AdaLomo (its state is allocated with .cuda(): CUDA only; its state now "
                                    "survives a resume)"))

def _build_grokadamw(ctx):
    """Upstream GrokAdamW with a state dict that round-trips (``optsched.optim.grokadamw``)."""
    return with_standard_state(ctx.cls), ctx.kwargs


_register(OptimizerSpec(
    "grokadamw", "grokadamw.GrokAdamW", package="grokadamw", extra="grokadamw",
    optim_args=(_arg("alpha_init", default=0.98), _arg("lamb", default=2.0), _arg("gamma", default=0.1),
                _arg("grokking_signal_decay_rate", default=0.1), _arg("gradient_clipping", default=1.0)),
    builder=_build_grokadamw,
    description="GrokAdamW (HF passes it no betas/eps: its defaults apply; its state now survives a resume)",
))

_SF_ARGS = (_arg("weight_lr_power", default=2.0), _arg("r", default=0.0))
for _name, _cls_name, _common, _warmup, _extra in (
    ("schedule_free_radam", "RAdamScheduleFree", (*ADAM, "weight_decay"), False, ()),
    ("schedule_free_adamw", "AdamWScheduleFree", (*ADAM, "weight_decay"), True, ()),
    ("schedule_free_sgd", "SGDScheduleFree", ("lr", "weight_decay"), True, (_arg("momentum"),)),
):
    _register(OptimizerSpec(
        _name, f"schedulefree.{_cls_name}", package="schedulefree", extra="schedulefree", common=_common,
        optim_args=_SF_ARGS + _extra, builder=partial(build_schedule_free, warmup=_warmup), needs_train_eval=True,
        description=f"schedulefree {_cls_name} (call optimizer.train()/eval())",
    ))

def _build_stable_adamw(ctx):
    """Upstream StableAdamW that runs its CPU kernel on CPU parameters (``optsched.optim.stable_adamw``)."""
    return with_triton_resolved(ctx.cls), ctx.kwargs


_register(OptimizerSpec(
    "stable_adamw", "optimi.StableAdamW", package="torch-optimi", extra="optimi", common=(*ADAM, "weight_decay"),
    # HF converts these with bool(), so "False" is True there; here they are parsed booleans.
    optim_args=(_arg("decouple_lr", "bool", False), OptimArg("max_lr", "float", None),
                OptimArg("kahan_sum", "bool", None)),
    builder=_build_stable_adamw,
    description="torch-optimi StableAdamW (on CPU it no longer tries Triton's GPU kernel where Triton is installed)",
))

# Muon on the hidden 2-D matrices, AdamW on the rest, as one optimizer (optsched's own; issue 5).
from optsched.optim.muon import muon_spec  # noqa: E402  (after the specs it may build on)

_register(muon_spec())

#: transformers 5.23's ``OptimizerNames`` values, all registered above.
TRANSFORMERS_NAMES = (
    "adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused", "adafactor",
    "adamw_anyprecision", "adamw_torch_4bit", "adamw_torch_8bit", "ademamix", "sgd", "adagrad", "adamw_bnb_8bit",
    "adamw_8bit", "ademamix_8bit", "lion_8bit", "lion_32bit", "paged_adamw_32bit", "paged_adamw_8bit",
    "paged_ademamix_32bit", "paged_ademamix_8bit", "paged_lion_32bit", "paged_lion_8bit", "rmsprop", "rmsprop_bnb",
    "rmsprop_bnb_8bit", "rmsprop_bnb_32bit", "galore_adamw", "galore_adamw_8bit", "galore_adafactor",
    "galore_adamw_layerwise", "galore_adamw_8bit_layerwise", "galore_adafactor_layerwise", "lomo", "adalomo",
    "grokadamw", "schedule_free_radam", "schedule_free_adamw", "schedule_free_sgd", "apollo_adamw",
    "apollo_adamw_layerwise", "stable_adamw",
)
#: torch's own optimizers by lower-case name.
TORCH_NAMES = ("adam", "adamw", "nadam", "radam", "adamax", "adadelta", "asgd", "rprop")
#: optsched's own additions.
OPTSCHED_NAMES = ("muon",)
BUILTIN_NAMES = TRANSFORMERS_NAMES + TORCH_NAMES + OPTSCHED_NAMES
