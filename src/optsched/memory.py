"""Optimizer-state memory: estimated from each optimizer's own formula, or counted after a step.

:func:`estimate_optimizer_memory` answers "how many bytes of optimizer state will ``optim`` hold for
this model?" *before* anything is allocated: it reads only each parameter's shape and element size
(so it works on a model built on the ``meta`` device) and the optimizer's hyper-parameters as
``create_optimizer`` would resolve them (``TrainingArguments`` + ``optim_args``). The optimizer's
package need not be installed.

:func:`measure_optimizer_state` counts the bytes an optimizer actually holds: every tensor in
``optimizer.state`` (quantized tensor subclasses by their inner tensors, projector objects by their
tensor attributes, shared tensors such as bitsandbytes' quantization maps once), the per-parameter
optimizers of a layer-wise optimizer, and state kept in ``param_groups`` (GrokAdamW).

Formulas (``n`` elements of ``s`` bytes; see docs/memory.md for the full table):

* Adam family (torch): ``2*n*s`` (``exp_avg``, ``exp_avg_sq``) ``+ 4`` (the ``step`` tensor);
  ``amsgrad`` adds ``n*s``.
* SGD: ``n*s`` with momentum, nothing without. Adagrad ``n*s + 4``. RMSprop ``n*s + 4`` (+``n*s``
  with momentum, +``n*s`` centered).
* Adafactor: rows ``prod(shape[:-1])`` + columns ``prod(shape[:-2]) * shape[-1]`` elements for
  tensors of 2 or more dimensions, ``n`` for vectors; ``+ n`` with ``beta1``; fp32 elements for fp16 /
  bf16 parameters (it steps them through an fp32 gradient).
* bitsandbytes 8-bit: per buffer ``n`` bytes + ``4*ceil(n/256)`` (fp32 absmax per block of 256),
  plus one 1 KiB quantization map per buffer kind, shared by all tensors; tensors with fewer than
  ``min_8bit_size`` (4096) elements and ``nn.Embedding`` weights (transformers' override) keep
  fp32 buffers (``4*n`` each).
* torchao 8-bit / 4-bit: per buffer ``n`` / ``n/2`` bytes of codes + ``4*n/block_size`` scales + a
  1 KiB / 64 B map, for tensors with ``n >= 4096`` and ``n % block_size == 0``; others ``n*s``.
* GaLore / APOLLO (approximate): the moments of a projected matrix ``m x k`` have ``max(m, k) * r``
  elements (``r = min(rank, m, k)``) plus the ``min(m, k) * r`` projection matrix.
* Muon: ``n*s`` (momentum) for Muon matrices, AdamW's for the rest (``muon_state_bytes``).

New optimizers get a formula with :func:`register_state_formula`; a name without one is a
``ValueError`` that says so.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from optsched._validation import check_bool, check_choice

__all__ = [
    "FormulaInfo",
    "MemoryEstimate",
    "TensorView",
    "estimate_optimizer_memory",
    "estimate_from_optimizer",
    "format_bytes",
    "get_state_formula",
    "infer_optimizer_name",
    "list_state_formulas",
    "measure_optimizer_state",
    "register_state_formula",
]

logger = logging.getLogger(__name__)

#: bytes of torch's scalar ``step`` tensor (float32; float64 only when that is the default dtype)
def _step_bytes() -> int:
    return 8 if torch.get_default_dtype() == torch.float64 else 4


BNB_BLOCK_SIZE = 256  # bitsandbytes' blockwise 8-bit state: one fp32 absmax per 256 elements
BNB_QMAP_BYTES = 256 * 4  # a 256-entry fp32 quantization map
TORCHAO_MIN_SIZE = 4096  # torchao quantizes only tensors with at least this many elements


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorView:
    """What a formula may know about one parameter: never its values.

    Attributes:
        name: the parameter's name (``"?"`` when unknown).
        shape: its shape.
        element_size: bytes per element of the parameter's dtype.
        is_embedding: the weight of an ``nn.Embedding`` (bitsandbytes 8-bit keeps those in fp32).
    """

    name: str
    shape: tuple[int, ...]
    element_size: int
    is_embedding: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @classmethod
    def of(cls, tensor: torch.Tensor, name: str = "?", is_embedding: bool = False) -> TensorView:
        return cls(name, tuple(int(d) for d in tensor.shape), tensor.element_size(), is_embedding)


#: A per-tensor formula: ``(tensor, hyper) -> {state kind: bytes}``. ``hyper`` holds the resolved
#: optimizer kwargs overlaid with the tensor's param-group keys (a group's own value wins).
TensorFormula = Callable[[TensorView, Mapping[str, Any]], dict[str, int]]
#: Bytes shared by all tensors (bitsandbytes' quantization maps): ``(views, hyper) -> {kind: bytes}``.
SharedFormula = Callable[[Sequence[TensorView], Mapping[str, Any]], dict[str, int]]


@dataclass(frozen=True)
class FormulaInfo:
    """The state-memory formula of one optimizer name.

    Attributes:
        per_tensor: bytes of state each parameter gets, by kind.
        formula: the formula in words (docs and reports).
        shared: bytes not tied to one tensor (``None``: none).
        approximate: the formula is a best effort (low-rank projections, packages it cannot check).
        prepare: ``(model, groups, hyper, name, args) -> groups``: reshapes the groups the way the
            optimizer's builder does (GaLore/APOLLO split, Muon split) when a model is known.
        group_only: hyper-parameters read from a param group only, never from the optimizer-wide
            kwargs (GaLore's ``rank`` marks the projected groups).
    """

    per_tensor: TensorFormula
    formula: str
    shared: SharedFormula | None = None
    approximate: bool = False
    prepare: Callable[..., list[dict[str, Any]]] | None = None
    group_only: tuple[str, ...] = ()


@dataclass
class MemoryEstimate:
    """Bytes of optimizer state, in total and broken down by param group and by kind of state.

    Attributes:
        optim: the optimizer name (or class name for a measurement).
        total_bytes: all bytes.
        by_group: group label (its ``name``, else ``"group i"``) -> bytes.
        by_kind: state kind (``exp_avg``, ``absmax``, ``step``, ...) -> bytes.
        num_tensors: parameters covered; num_elements: their elements.
        measured: True when counted from ``optimizer.state``, False for a formula's estimate.
        approximate: the formula is a best effort.
        formula: the formula in words (estimates only).
        notes: anything the reader should know (fp32 fallbacks, missing state, ...).
    """

    optim: str
    total_bytes: int
    by_group: dict[str, int] = field(default_factory=dict)
    by_kind: dict[str, int] = field(default_factory=dict)
    num_tensors: int = 0
    num_elements: int = 0
    measured: bool = False
    approximate: bool = False
    formula: str = ""
    notes: tuple[str, ...] = ()

    @property
    def bytes_per_element(self) -> float:
        """``total_bytes / num_elements`` (0 without elements)."""
        return self.total_bytes / self.num_elements if self.num_elements else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return {
            "optim": self.optim,
            "total_bytes": self.total_bytes,
            "by_group": dict(self.by_group),
            "by_kind": dict(self.by_kind),
            "num_tensors": self.num_tensors,
            "num_elements": self.num_elements,
            "bytes_per_element": round(self.bytes_per_element, 4),
            "measured": self.measured,
            "approximate": self.approximate,
            "formula": self.formula,
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        how = "measured" if self.measured else ("estimated, approximate" if self.approximate else "estimated")
        lines = [
            f"{self.optim}: {format_bytes(self.total_bytes)} of optimizer state ({how}; "
            f"{self.bytes_per_element:.3g} bytes per parameter element, {self.num_tensors} tensors)"
        ]
        if self.by_group:
            lines.append("  by group: " + ", ".join(f"{k} {format_bytes(v)}" for k, v in self.by_group.items()))
        if self.by_kind:
            lines.append("  by kind:  " + ", ".join(f"{k} {format_bytes(v)}" for k, v in self.by_kind.items()))
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


def format_bytes(n: int) -> str:
    """``1536 -> '1.50 KiB'`` (binary units; bytes below 1 KiB as ``'12 B'``)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} TiB"  # pragma: no cover - the loop returns at TiB


# --------------------------------------------------------------------------------------------------
# formula building blocks
# --------------------------------------------------------------------------------------------------


def _buffers(*kinds: str, step: bool = True, scalars: Sequence[str] = ()) -> TensorFormula:
    """``len(kinds)`` buffers of the parameter's size and dtype, plus torch's scalar tensors."""

    def formula(t: TensorView, hyper: Mapping[str, Any]) -> dict[str, int]:
        out = {kind: t.numel * t.element_size for kind in kinds}
        for name in (("step",) if step else ()) + tuple(scalars):
            out[name] = _step_bytes()
        return out

    return formula


def _adam(t: TensorView, hyper: Mapping[str, Any]) -> dict[str, int]:
    kinds = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if hyper.get("amsgrad") else ())
    return _buffers(*kinds)(t, hyper)


def _sgd(t: TensorView, hyper: Mapping[str, Any]) -> dict[str, int]:
    # torch's SGD allocates momentum_buffer only when momentum != 0
    return {"momentum_buffer": t.numel * t.element_size} if hyper.get("momentum") else {}


def _rmsprop(t: TensorView, hyper: Mapping[str, Any]) -> dict[str, int]:
    kinds = ("square_avg",)
    if hyper.get("momentum"):
        kinds += ("momentum_buffer",)
    if hyper.get("centered"):
        kinds += ("grad_avg",)
    return _buffers(*kinds)(t, hyper)


def _factored(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(row, column) elements of Adafactor's factored second moment, or None for a vector."""
    if len(shape) < 2:
        return None
    return math.prod(shape[:-1]), math.prod(shape[:-2]) * shape[-1]


def _fp32_state_size(s: int) -> int:
    """Bytes per state element of an optimizer that steps 16-bit parameters through fp32 (Adafactor:
    transformers' and optsched's cast an fp16 / bf16 gradient to fp32, and the state follows it)."""
    return 4 if s == 2 else s


def _adafactor_bytes(shape: tuple[int, ...], s: int, hyper: Mapping[str, Any]) -> dict[str, int]:
    """Adafactor's state for a gradient of ``shape``; ``s`` is the state's element size (fp32 for a
    16-bit parameter, see :func:`_fp32_state_size`)."""
    out: dict[str, int] = {}
    factored = _factored(shape)
    if factored is None:
        out["exp_avg_sq"] = math.prod(shape) * s
    else:
        out["exp_avg_sq_row"], out["exp_avg_sq_col"] = factored[0] * s, factored[1] * s
    if hyper.get("beta1") is not None:
        out["exp_avg"] = math.prod(shape) * s
    return out


def _adafactor(t: TensorView, hyper: Mapping[str, Any]) -> dict[str, int]:
    s = _fp32_state_size(t.element_size)
    out = _adafactor_bytes(t.shape, s, hyper)
    if hyper.get("scale_parameter"):  # the parameter's RMS, a 0-dim tensor kept for the step size
        out["RMS"] = s
    return out


def _bnb(slots: Sequence[int]) -> tuple[TensorFormula, SharedFormula]:
    """bitsandbytes: ``slots[i]`` buffers stacked in state slot i (AdEMAMix's state1 holds two)."""

    def eight_bit(t: TensorView, hyper: Mapping[str, Any]) -> bool:
        return (
            hyper.get("optim_bits", 32) == 8
            and t.numel >= hyper.get("min_8bit_size", 4096)
            and not t.is_embedding
        )

    def per_tensor(t: TensorView, hyper: Mapping[str, Any]) -> dict[str, int]:
        out: dict[str, int] = {}
        blocks = -(-t.numel // BNB_BLOCK_SIZE)
        for i, count in enumerate(slots, start=1):
            if eight_bit(t, hyper):
                out[f"state{i}"] = count * t.numel
                out[f"absmax{i}"] = count * blocks * 4
            else:
                out[f"state{i}"] = count * t.numel * 4  # fp32 whatever the parameter's dtype
        return out

    def shared(views: Sequence[TensorView], hyper: Mapping[str, Any]) -> dict[str, int]:
        if not any(eight_bit(t, hyper) for t in views):
            return {}
        return {f"qmap{i}": BNB_QMAP_BYTES for i in range(1, len(slots) + 1)}

    return per_tensor, shared


def _torchao(bits: int) -> TensorFormula:
    qmap = (2**bits) * 4

    def per_tensor(t: TensorView, hyper: Mapping[str, Any]) -> dict[str, int]:
        block = int(hyper.get("block_size", 256))
        kinds = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if hyper.get("amsgrad") else ())
        out: dict[str, int] = {"step": _step_bytes()}
        quantized = t.numel >= TORCHAO_MIN_SIZE and t.numel % block == 0
        for kind in kinds:
            if quantized:
                out[kind] = t.numel * bits // 8 + (t.numel // block) * 4 + qmap
            else:
                out[kind] = t.numel * t.element_size
        return out

    return per_tensor


def _lowrank_shapes(t: TensorView, hyper: Mapping[str, Any]) -> tuple[tuple[int, ...], int] | None:
    """(projected shape, projection-matrix elements) of a GaLore/APOLLO target, None for others."""
    if "rank" not in hyper or len(t.shape) != 2:
        return None
    m, k = t.shape
    r = min(int(hyper["rank"]), m, k)
    proj_type = hyper.get("proj_type", "std")
    right = {"std": m >= k, "reverse_std": m < k, "right": True, "left": False}.get(proj_type, m >= k)
    # right projection: low-rank grad = G @ P^T with P (r, k); left: P^T @ G with P (m, r)
    return ((m, r), r * k) if right else ((r, k), m * r)


def _galore(inner: str) -> TensorFormula:
    def per_tensor(t: TensorView, hyper: Mapping[str, Any]) -> dict[str, int]:
        low = _lowrank_shapes(t, hyper)
        shape = t.shape if low is None else low[0]
        s = t.element_size
        if inner == "adafactor":
            # GaLore's Adafactor casts a 16-bit gradient to fp32 before projecting it: the projector, the
            # moments and the RMS (a 0-dim tensor of the parameter's fp32 copy) are fp32 then
            s = _fp32_state_size(s)
            out = _adafactor_bytes(shape, s, hyper)
            out["RMS"] = s
        elif inner == "adamw_8bit":
            n = math.prod(shape)
            out = {"state1": n, "state2": n, "absmax": 2 * 4 * -(-n // BNB_BLOCK_SIZE)}
        else:
            out = {"exp_avg": math.prod(shape) * s, "exp_avg_sq": math.prod(shape) * s}
        if low is not None:
            out["projector"] = low[1] * s
            if inner == "apollo":
                out["scaled_grad"] = s  # the norm of the scaled gradient: 0-dim, the gradient's dtype
        return out

    return per_tensor


def _muon(t: TensorView, hyper: Mapping[str, Any]) -> dict[str, int]:
    # same formula as optsched.optim.muon.muon_state_bytes, by kind
    if "use_muon" not in hyper:
        raise ValueError(
            f"parameter {t.name!r} is in a group without 'use_muon'; optim='muon' needs the model to split "
            "Muon and AdamW parameters: pass the model (not bare groups) to estimate_optimizer_memory."
        )
    if hyper["use_muon"]:
        return {"momentum_buffer": t.numel * t.element_size}
    return _adam(t, hyper)


def _stable_adamw(t: TensorView, hyper: Mapping[str, Any]) -> dict[str, int]:
    # optimi keeps eps**2 as a 0-dim tensor of the parameter's dtype
    out = {"exp_avg": t.numel * t.element_size, "exp_avg_sq": t.numel * t.element_size, "eps_sq": t.element_size}
    kahan = hyper.get("kahan_sum")
    if kahan or (kahan is None and t.element_size < 4):  # optimi: Kahan summation by default in low precision
        out["kahan_comp"] = t.numel * t.element_size
    return out


def _anyprecision(t: TensorView, hyper: Mapping[str, Any]) -> dict[str, int]:
    def size(key: str, default: torch.dtype) -> int:
        dtype = hyper.get(key, default)
        return torch.empty((), dtype=dtype).element_size() if isinstance(dtype, torch.dtype) else 4

    out = {
        "step": _step_bytes(),
        "exp_avg": t.numel * size("momentum_dtype", torch.float32),
        "exp_avg_sq": t.numel * size("variance_dtype", torch.float32),
    }
    if hyper.get("use_kahan_summation"):
        out["compensation"] = t.numel * size("compensation_buffer_dtype", torch.bfloat16)
    return out


def _adalomo(t: TensorView, hyper: Mapping[str, Any]) -> dict[str, int]:
    factored = _factored(t.shape)
    if factored is None:
        return {"exp_avg_sq": t.numel * 4}
    return {"exp_avg_sq_row": factored[0] * 4, "exp_avg_sq_col": factored[1] * 4}


def _nothing(t: TensorView, hyper: Mapping[str, Any]) -> dict[str, int]:
    return {}


# --------------------------------------------------------------------------------------------------
# group preparation (what the optimizer's builder does to the groups)
# --------------------------------------------------------------------------------------------------


_LOWRANK_KEYS = ("rank", "update_proj_gap", "scale", "proj_type", "proj", "scale_type")


def _prepare_lowrank(model: nn.Module, groups: list[dict[str, Any]], hyper: Mapping[str, Any], name: str,
                     args: Any) -> list[dict[str, Any]]:
    from optsched.optim.lowrank import select_target_param_names, split_groups

    targets = select_target_param_names(model, getattr(args, "optim_target_modules", None), name)
    settings = {k: hyper[k] for k in _LOWRANK_KEYS if k in hyper}
    return split_groups(groups, targets, settings)


def _prepare_muon(model: nn.Module, groups: list[dict[str, Any]], hyper: Mapping[str, Any], name: str,
                  args: Any) -> list[dict[str, Any]]:
    from optsched.optim.muon import split_muon_groups

    return split_muon_groups(model, groups)


# --------------------------------------------------------------------------------------------------
# the registry of formulas, keyed by optimizer name
# --------------------------------------------------------------------------------------------------

_FORMULAS: dict[str, FormulaInfo] = {}
_LOCK = threading.Lock()

ADAM_TEXT = "2*n*s (exp_avg, exp_avg_sq) + 4 (step); amsgrad: +n*s"


def register_state_formula(
    name: str,
    per_tensor: TensorFormula,
    *,
    formula: str = "",
    shared: SharedFormula | None = None,
    approximate: bool = False,
    prepare: Callable[..., list[dict[str, Any]]] | None = None,
    group_only: Iterable[str] = (),
    overwrite: bool = False,
) -> FormulaInfo:
    """Give an optimizer name its state-memory formula (see :class:`FormulaInfo`).

    Raises:
        ValueError: the name has a formula already and ``overwrite`` is False.
        TypeError: ``per_tensor`` is not callable.
    """
    check_bool("overwrite", overwrite)
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty string, got {type(name).__name__} {name!r}.")
    if not callable(per_tensor):
        raise TypeError(f"per_tensor must be callable (TensorView, hyper) -> dict, got {type(per_tensor).__name__}.")
    info = FormulaInfo(per_tensor, formula, shared, approximate, prepare, tuple(group_only))
    with _LOCK:
        if name in _FORMULAS and not overwrite:
            raise ValueError(f"optim={name!r} has a state formula already; pass overwrite=True to replace it.")
        _FORMULAS[name] = info
    return info


def list_state_formulas() -> list[str]:
    """Sorted names that have a state-memory formula."""
    return sorted(_FORMULAS)


def get_state_formula(name: str) -> FormulaInfo:
    """The formula of ``name``.

    Raises:
        ValueError: no formula for the name (with the closest names and how to add one).
    """
    if name not in _FORMULAS:
        try:
            check_choice("optim", name, _FORMULAS, what="optimizer name with a state-memory formula")
        except ValueError as exc:
            raise ValueError(
                f"{exc} Register one with optsched.memory.register_state_formula({name!r}, per_tensor)."
            ) from None
    return _FORMULAS[name]


def _builtin_formulas() -> None:
    adam_like = {
        "adamw_torch": ADAM_TEXT, "adamw_torch_fused": ADAM_TEXT, "adamw": ADAM_TEXT, "adam": ADAM_TEXT,
        "adamw_torch_xla": ADAM_TEXT, "adamw_torch_npu_fused": ADAM_TEXT,
    }
    for name, text in adam_like.items():
        register_state_formula(name, _adam, formula=text, overwrite=True)
    plain = {
        "radam": (("exp_avg", "exp_avg_sq"), ()),
        "adamax": (("exp_avg", "exp_inf"), ()),
        "nadam": (("exp_avg", "exp_avg_sq"), ("mu_product",)),
        "adadelta": (("square_avg", "acc_delta"), ()),
        "rprop": (("prev", "step_size"), ()),
        "asgd": (("ax",), ("eta", "mu")),
        "adagrad": (("sum",), ()),
    }
    for name, (kinds, scalars) in plain.items():
        text = f"{len(kinds)}*n*s ({', '.join(kinds)}) + {4 * (1 + len(scalars))} (step{''.join(', ' + s for s in scalars)})"
        register_state_formula(name, _buffers(*kinds, scalars=scalars), formula=text, overwrite=True)
    register_state_formula("sgd", _sgd, formula="n*s (momentum_buffer) with momentum, 0 without", overwrite=True)
    register_state_formula("rmsprop", _rmsprop, formula="n*s (square_avg) + 4 (step); momentum: +n*s; centered: +n*s",
                           overwrite=True)
    register_state_formula(
        "adafactor", _adafactor, overwrite=True,
        formula="factored (>=2-D): (prod(shape[:-1]) + prod(shape[:-2])*shape[-1])*s, vectors n*s; beta1: +n*s; "
                "scale_parameter: +s (RMS) (s = 4 for fp16/bf16 parameters: the state is fp32)",
    )
    for names, slots, what in (
        (("adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"), (1, 1), "AdamW"),
        (("lion_8bit", "lion_32bit", "paged_lion_8bit", "paged_lion_32bit"), (1,), "Lion"),
        (("rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit"), (1,), "RMSprop"),
        (("ademamix", "ademamix_8bit", "paged_ademamix_8bit", "paged_ademamix_32bit"), (2, 1), "AdEMAMix"),
    ):
        per_tensor, shared = _bnb(slots)
        buffers = sum(slots)
        text = (f"bitsandbytes {what}: 32-bit {4 * buffers}*n; 8-bit {buffers}*(n + 4*ceil(n/256)) + "
                f"{len(slots)} KiB of shared qmaps (fp32 below min_8bit_size=4096 and for nn.Embedding weights)")
        for name in names:
            register_state_formula(name, per_tensor, shared=shared, formula=text, overwrite=True)
    register_state_formula("adamw_torch_8bit", _torchao(8), overwrite=True,
                           formula="torchao: 2*(n + 4*n/block_size + 1024) + 4 (step) if n>=4096 and n%block_size==0, else 2*n*s + 4")
    register_state_formula("adamw_torch_4bit", _torchao(4), overwrite=True,
                           formula="torchao: 2*(n/2 + 4*n/block_size + 64) + 4 (step) if n>=4096 and n%block_size==0, else 2*n*s + 4")
    for name, kinds in (("schedule_free_adamw", ("z", "exp_avg_sq")), ("schedule_free_radam", ("z", "exp_avg_sq")),
                        ("schedule_free_sgd", ("z",))):
        register_state_formula(name, _buffers(*kinds, step=False), formula=f"{len(kinds)}*n*s ({', '.join(kinds)})",
                               overwrite=True)
    lowrank_text = ("targets (m x k, r=min(rank,m,k)): moments of max(m,k)*r elements + a min(m,k)*r projection; "
                    "other tensors as the inner optimizer")
    for name, inner in (("galore_adamw", "adamw"), ("galore_adafactor", "adafactor"), ("galore_adamw_8bit", "adamw_8bit"),
                        ("apollo_adamw", "apollo")):
        for suffix in ("", "_layerwise"):
            register_state_formula(name + suffix, _galore(inner), formula=lowrank_text, approximate=True,
                                   prepare=_prepare_lowrank, group_only=_LOWRANK_KEYS, overwrite=True)
    register_state_formula("grokadamw", _buffers("exp_avg", "exp_avg_sq", "grok_ema", step=False),
                           formula="3*n*s (exp_avg, exp_avg_sq, grok_ema; kept in param_groups[i]['state'])",
                           overwrite=True)
    register_state_formula("stable_adamw", _stable_adamw, overwrite=True,
                           formula="2*n*s + s (eps_sq); Kahan summation (default below fp32): +n*s")
    register_state_formula("lomo", _nothing, formula="0 (the update is fused into backward; no state)", overwrite=True)
    register_state_formula("adalomo", _adalomo, approximate=True, overwrite=True,
                           formula="fp32 factored second moment: (rows + columns)*4 for matrices, 4*n for vectors")
    register_state_formula("adamw_anyprecision", _anyprecision, approximate=True, overwrite=True,
                           formula="n*(momentum + variance dtype sizes) + 4 (step); Kahan: +n*compensation size")
    register_state_formula("muon", _muon, prepare=_prepare_muon, overwrite=True,
                           formula="Muon matrices n*s (momentum_buffer); others AdamW's 2*n*s + 4 (muon_state_bytes)")


_builtin_formulas()


# --------------------------------------------------------------------------------------------------
# estimate
# --------------------------------------------------------------------------------------------------


def _group_label(group: Mapping[str, Any], index: int) -> str:
    name = group.get("name")
    return str(name) if name else f"group {index}"


def _embedding_ids(model: nn.Module | None) -> set[int]:
    if model is None:
        return set()
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def _as_groups(params: Any) -> list[dict[str, Any]]:
    """Normalise a list of groups / tensors into groups (as torch.optim.Optimizer does)."""
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of tensors or of param-group dicts, got a single Tensor.")
    if isinstance(params, (str, bytes, Mapping)) or not isinstance(params, Iterable):
        raise TypeError(
            "model_or_groups must be a model (torch.nn.Module) or a list of tensors or param-group dicts, "
            f"got {type(params).__name__} {params!r}."
        )
    items = list(params)
    if not items:
        raise ValueError("model_or_groups is empty; accepted: a model, or a non-empty list of groups or tensors.")
    if all(isinstance(g, Mapping) for g in items):
        groups = []
        for i, g in enumerate(items):
            if "params" not in g:
                raise ValueError(f"param group {i} has no 'params' key; accepted: dicts with 'params'.")
            p = g["params"]
            groups.append({**g, "params": [p] if isinstance(p, torch.Tensor) else list(p)})
        return groups
    if all(isinstance(p, torch.Tensor) for p in items):
        return [{"params": items}]
    raise TypeError("model_or_groups must be a torch.nn.Module, a list of param-group dicts or a list of tensors.")


def resolve_hyperparameters(name: str, optim_args: Any = None, args: Any = None) -> dict[str, Any]:
    """The kwargs ``create_optimizer`` would pass for ``name`` (common + fixed + ``optim_args``), without
    importing the optimizer's package.

    Raises:
        ValueError: unknown name or bad ``optim_args``.
    """
    from optsched.arguments import as_training_arguments
    from optsched.optim import parse_optim_args
    from optsched.optim.spec import get_optimizer_spec

    args = as_training_arguments(args)
    spec = get_optimizer_spec(name)
    user = parse_optim_args(spec.name, args.optim_args if optim_args is None else optim_args)
    return spec.resolve_kwargs(args, user)


def _estimate(
    name: str,
    info: FormulaInfo,
    groups: Sequence[Mapping[str, Any]],
    hyper: Mapping[str, Any],
    names: Mapping[int, str],
    embeddings: set[int],
    notes: list[str],
) -> MemoryEstimate:
    by_group: dict[str, int] = {}
    by_kind: dict[str, int] = {}
    views: list[TensorView] = []
    seen: set[int] = set()
    hyper = {k: v for k, v in hyper.items() if k not in info.group_only}
    for index, group in enumerate(groups):
        label = _group_label(group, index)
        merged = {**hyper, **{k: v for k, v in group.items() if k not in ("params", "param_names")}}
        group_names = group.get("param_names") or []
        total = 0
        for i, p in enumerate(group["params"]):
            if id(p) in seen:
                continue  # a tensor in two groups is refused by torch; count it once here
            seen.add(id(p))
            pname = group_names[i] if i < len(group_names) else names.get(id(p), "?")
            view = TensorView.of(p, pname, id(p) in embeddings)
            views.append(view)
            for kind, nbytes in info.per_tensor(view, merged).items():
                by_kind[kind] = by_kind.get(kind, 0) + int(nbytes)
                total += int(nbytes)
        by_group[label] = by_group.get(label, 0) + total
    if info.shared is not None:
        for kind, nbytes in info.shared(views, hyper).items():
            by_kind[kind] = by_kind.get(kind, 0) + int(nbytes)
            by_group["shared"] = by_group.get("shared", 0) + int(nbytes)
    return MemoryEstimate(
        optim=name,
        total_bytes=sum(by_kind.values()),
        by_group=by_group,
        by_kind=by_kind,
        num_tensors=len(views),
        num_elements=sum(v.numel for v in views),
        measured=False,
        approximate=info.approximate,
        formula=info.formula,
        notes=tuple(notes),
    )


def estimate_optimizer_memory(
    model_or_groups: nn.Module | Iterable[Any],
    optim: str | None = None,
    optim_args: str | Mapping[str, Any] | None = None,
    args: Any = None,
    *,
    model: nn.Module | None = None,
) -> MemoryEstimate:
    """Bytes of optimizer state ``optim`` will hold after its first step, without allocating it.

    Per parameter ``n`` elements of ``s`` bytes, each optimizer's own formula (module docstring,
    docs/memory.md); e.g. AdamW ``8n + 4`` bytes for fp32. Reads only shapes and dtypes, so a model on
    the ``meta`` device works.

    Args:
        model_or_groups: a model (its groups are built as ``create_optimizer`` builds them, with
            ``args``), or param groups / a list of tensors.
        optim: a registered optimizer name; ``None`` means ``args.optim``.
        optim_args: the optimizer's ``optim_args`` (dict or string); ``None`` means ``args.optim_args``.
        args: optsched's or transformers' ``TrainingArguments`` (``None``: defaults).
        model: with explicit groups, the model they come from (GaLore/APOLLO targets, the Muon split and
            bitsandbytes' fp32 embeddings need it).

    Returns:
        A :class:`MemoryEstimate` with ``total_bytes``, ``by_group`` and ``by_kind``.

    Raises:
        ValueError: unknown name, a name without a formula, bad ``optim_args``, empty groups.
        TypeError: ``model_or_groups`` is neither a model nor groups.

    Example:
        >>> est = estimate_optimizer_memory(torch.nn.Linear(1000, 1000), "adamw_torch")
        >>> est.total_bytes  # 2 * 1,001,000 * 4 + 2 * 4
        8008008
    """
    from optsched.arguments import as_training_arguments
    from optsched.optim.spec import get_optimizer_spec

    args = as_training_arguments(args)
    name = get_optimizer_spec(args.optim if optim is None else optim).name
    info = get_state_formula(name)
    hyper = resolve_hyperparameters(name, optim_args, args)
    notes: list[str] = []
    if isinstance(model_or_groups, nn.Module):
        from optsched.params import build_param_groups, unwrap_compiled

        model = unwrap_compiled(model_or_groups)
        groups = build_param_groups(model, args)
    else:
        groups = _as_groups(model_or_groups)
    if model is not None and info.prepare is not None:
        groups = info.prepare(model, [dict(g) for g in groups], hyper, name, args)
    elif info.prepare is not None:
        notes.append("no model given: groups are used as they are (no low-rank / Muon split)")
    names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
    if hyper.get("optim_bits") == 8 and model is None:
        notes.append("no model given: nn.Embedding weights cannot be recognised (8-bit assumed)")
    if info.approximate:
        notes.append("approximate: best-effort formula")
    return _estimate(name, info, groups, hyper, names, _embedding_ids(model), notes)


# --------------------------------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------------------------------


def _tensor_parts(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding ``t``'s data (a tensor subclass by its ``__tensor_flatten__``)."""
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is not None and type(t) is not torch.Tensor and type(t) is not nn.Parameter:
        names, _ = t.__tensor_flatten__()
        parts: list[torch.Tensor] = []
        for attr in names:
            parts.extend(_tensor_parts(getattr(t, attr)))
        return parts
    return [t]


def _values_tensors(value: Any, depth: int = 0) -> list[torch.Tensor]:
    """Tensors in a state value: a tensor, a list/tuple/dict of them, or an object's tensor attributes."""
    if isinstance(value, torch.Tensor):
        return _tensor_parts(value)
    if depth > 2 or value is None or isinstance(value, (str, bytes, int, float, bool)):
        return []
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _values_tensors(v, depth + 1)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _values_tensors(v, depth + 1)]
    attrs = getattr(value, "__dict__", None)
    if attrs:  # projector objects (GaLore / APOLLO) keep their matrix as an attribute
        return [t for v in attrs.values() for t in _values_tensors(v, depth + 1)]
    return []


def _state_sources(optimizer: torch.optim.Optimizer) -> list[tuple[int, Mapping[Any, Any]]]:
    """(outer group index or -1, param -> state dict) mappings that hold this optimizer's state."""
    sources: list[tuple[int, Mapping[Any, Any]]] = [(-1, optimizer.state)]
    for inner in getattr(optimizer, "optimizers", None) or []:  # optsched's LayerWiseOptimizer
        if isinstance(inner, torch.optim.Optimizer):
            sources.append((-1, inner.state))
    for index, group in enumerate(optimizer.param_groups):
        if isinstance(group.get("state"), Mapping):  # GrokAdamW keeps state in its groups
            sources.append((index, group["state"]))
    return sources


def measure_optimizer_state(optimizer: torch.optim.Optimizer) -> MemoryEstimate:
    """Bytes the optimizer's state holds now: ``sum(t.numel() * t.element_size())`` over its tensors.

    Quantized tensor subclasses count their inner tensors (codes, scales, maps); objects in the state
    (GaLore/APOLLO projectors) their tensor attributes; a tensor shared by several parameters
    (bitsandbytes' maps) once, under the group of the first parameter that holds it.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}.")
    group_of: dict[int, int] = {}
    for index, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            group_of.setdefault(id(p), index)
    labels = [_group_label(g, i) for i, g in enumerate(optimizer.param_groups)]
    by_group: dict[str, int] = {}
    by_kind: dict[str, int] = {}
    seen: set[tuple[int, int, Any]] = set()
    params: dict[int, torch.Tensor] = {}
    for fixed_group, state in _state_sources(optimizer):
        for param, values in state.items():
            if not isinstance(values, Mapping):
                continue
            params[id(param)] = param
            index = fixed_group if fixed_group >= 0 else group_of.get(id(param), -1)
            label = labels[index] if index >= 0 else "other"
            for kind, value in values.items():
                for t in _values_tensors(value):
                    key = (t.data_ptr(), t.nbytes, t.dtype) if t.device.type != "meta" else (id(t), 0, None)
                    if key in seen and key[0] != 0:
                        continue
                    seen.add(key)
                    nbytes = t.numel() * t.element_size()
                    by_kind[str(kind)] = by_kind.get(str(kind), 0) + nbytes
                    by_group[label] = by_group.get(label, 0) + nbytes
    notes = () if params else ("the optimizer holds no state yet (state is allocated on the first step)",)
    return MemoryEstimate(
        optim=type(optimizer).__name__,
        total_bytes=sum(by_kind.values()),
        by_group=by_group,
        by_kind=by_kind,
        num_tensors=len(params),
        num_elements=sum(p.numel() for p in params.values() if isinstance(p, torch.Tensor)),
        measured=True,
        notes=notes,
    )


# --------------------------------------------------------------------------------------------------
# estimate for an existing optimizer (used by explain)
# --------------------------------------------------------------------------------------------------


def _is_spec_class(spec_cls: Any, cls: type) -> bool:
    """Whether a spec's ``cls`` (class, dotted path or tuple of paths) is ``cls``, or the upstream class
    that ``cls`` stands for when it is optsched's subclass of one (``_optsched_wraps``). A dotted path is
    resolved only when its module is imported already: an optimizer of that class exists, so its
    package is loaded, and nothing else gets imported here."""
    import sys

    cls = getattr(cls, "_optsched_wraps", cls)  # optsched's subclass of an upstream class (grokadamw)
    for entry in spec_cls if isinstance(spec_cls, tuple) else (spec_cls,):
        if not isinstance(entry, str):
            if entry is cls:
                return True
            continue
        module_name, _, attr = entry.rpartition(".")
        module = sys.modules.get(module_name)
        if module is not None and getattr(module, attr, None) is cls:
            return True
    return False


def _facts(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's hyper-parameters: defaults + bitsandbytes' ``args`` + a few attributes."""
    facts = dict(optimizer.defaults)
    extra = getattr(optimizer, "args", None)
    if extra is not None and hasattr(extra, "__dict__"):
        facts.update(vars(extra))
    for attr in ("is_paged", "block_size"):
        if hasattr(optimizer, attr):
            facts[attr] = getattr(optimizer, attr)
    return facts


def infer_optimizer_name(optimizer: torch.optim.Optimizer) -> str | None:
    """The registered name that builds this optimizer's class with its fixed kwargs, or None.

    An optimizer from :func:`optsched.create_optimizer` answers with the name it was built from. For
    any other, among the names whose class is the optimizer's (the inner class for a layer-wise
    optimizer), the one whose fixed kwargs (``fused``, ``optim_bits``, ``is_paged``) all agree with the
    optimizer wins, most agreeing keys first, then transformers' names (``adamw_torch`` before
    torch's ``adamw``, which builds the same class). When none agrees on all of them (an
    ``Adafactor(params)`` with its own defaults, where ``"adafactor"`` fixes ``scale_parameter=False``),
    the name of its class with the fewest disagreeing keys: the formulas read the hyper-parameters from
    the groups, so the estimate is still the optimizer's.
    """
    from optsched.optim.catalog import BUILTIN_NAMES
    from optsched.optim.spec import list_optimizers, get_optimizer_spec

    recorded = getattr(optimizer, "_optsched_name", None)
    if recorded in list_optimizers():
        return recorded
    inner = getattr(optimizer, "optimizer_cls", None)
    cls = inner if inner is not None else type(optimizer)
    facts = _facts(optimizer)
    rank = {name: i for i, name in enumerate(BUILTIN_NAMES)}  # transformers' names come first there
    best: tuple[int, int, int, str] | None = None
    for name in list_optimizers():
        spec = get_optimizer_spec(name)
        if (inner is not None) != name.endswith("_layerwise"):
            continue
        if not _is_spec_class(spec.cls, cls):
            continue
        known = [key for key in spec.fixed if key in facts]
        disagree = sum(facts[key] != spec.fixed[key] for key in known)
        candidate = (-disagree, len(known) - disagree, -rank.get(name, len(rank)), name)
        if best is None or candidate[:3] > best[:3]:
            best = candidate
    return None if best is None else best[3]


def estimate_from_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module | None = None) -> MemoryEstimate | None:
    """The formula's estimate for an optimizer that exists (its groups and hyper-parameters), or
    ``None`` when its class has no registered name with a formula."""
    name = infer_optimizer_name(optimizer)
    if name is None or name not in _FORMULAS:
        return None
    info = _FORMULAS[name]
    names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
    notes = ["approximate: best-effort formula"] if info.approximate else []
    return _estimate(name, info, optimizer.param_groups, _facts(optimizer), names, _embedding_ids(model), notes)
