"""Adafactor with transformers' semantics, without transformers, and with fewer passes over memory.

Adafactor (Shazeer & Stern, 2018, https://arxiv.org/abs/1804.04235) keeps, for a matrix parameter, only
the row and column means of the squared gradient instead of a full second moment. This module
reproduces ``transformers.optimization.Adafactor`` (arguments, defaults, state keys, param-group keys,
``_get_lr``) so that a state dict moves freely between the two, and ``AdafactorSchedule``, its proxy
scheduler. One Adafactor step of a parameter ``p`` with gradient ``g`` at step ``t`` (1-based):

.. code-block:: text

    rel_step  = min(1e-6 * t if warmup_init else 1e-2, 1 / sqrt(t))   if relative_step else lr
    lr_t      = max(eps[1], RMS(p)) * rel_step                         if scale_parameter else rel_step
    beta2_t   = 1 - t ** decay_rate
    G         = g**2 + eps[0]
    factored (p.ndim >= 2; rows R and columns C are the last two dims):
        row   = beta2_t * row + (1 - beta2_t) * mean_C(G)
        col   = beta2_t * col + (1 - beta2_t) * mean_R(G)
        u     = g * rsqrt(row / mean_R(row))[..., :, None] * rsqrt(col)[..., None, :]
    unfactored (vectors, scalars):
        v     = beta2_t * v + (1 - beta2_t) * G
        u     = g * rsqrt(v)
    u         = lr_t * u / max(1, RMS(u) / clip_threshold)
    m         = beta1 * m + (1 - beta1) * u;  u = m                      (only when beta1 is not None)
    p         = p - weight_decay * lr_t * p - u

where ``RMS(x) = ||x||_2 / sqrt(x.numel())``. At ``t = 1`` with the defaults, ``beta2_t = 0`` (the
second moment is the first squared gradient) and ``rel_step = 1e-2``.

Two implementations live here:

* :func:`adafactor_reference_update`, a pure function of ``(param, grad, state, hyperparameters)``
  written as the formulas above; the tests hold the fast path to it and to transformers.
* :class:`Adafactor`, the fast path. transformers' loop makes about 21 passes over a matrix-sized
  memory per step, most of them over four freshly allocated temporaries. This one reads the gradient
  and the parameter once each from memory and writes the parameter once; the second reads of each
  and the rest happen in cache, matrix by matrix, with one matrix-sized workspace reused from matrix
  to matrix and freed after the step. Per matrix: ``||p||**2`` (a BLAS dot, with
  ``scale_parameter``) right before its update, so that ``p`` is still in cache when the update
  reads it; ``S = g**2`` into the workspace; its row sums, which give the row factor ``r``; then one
  GEMM over ``S`` for both the column sums and the update's RMS,
  ``[1; r**2] @ S`` and ``||u||**2 = sum_j (sum_i r_i**2 S_ij) / col_j`` (no scaled copy of ``g``,
  no norm over it); then the workspace becomes ``g * rsqrt(col)`` and
  ``p.addcmul_(g * rsqrt(col), lr_t * r / clip)`` applies the update in one pass, the per-row
  factor broadcast. Vectors go through ``torch._foreach_*`` kernels, a whole group at once. fp32
  parameters are updated in place; fp16/bf16 ones through an fp32 copy with fp32 state, as
  transformers does.

Speed (``python -m benchmarks.adafactor_step``: 50.4M fp32 parameters, 2 CPU threads): the passes
above are what an eager implementation cannot avoid (the clipping factor needs every row before any
element is updated, so ``g`` is read twice); the streaming reads (``g * g``, the dot) run at the
machine's memory rate, and the passes in cache and the ~40 small tensor ops per matrix are the rest.
Two changes gave 0.83 of the earlier step with transformers' defaults (23.0 ms against 27.6 ms side
by side, 0.89 in the benchmark's alternation): the two GEMVs, which MKL runs on one thread, became
one GEMM split by rows over the threads; and the parameter's RMS moved from one ``_foreach_norm``
over the whole group before the step to a dot right before each matrix's update. With ``beta1`` the
update is materialised in the workspace and the first moment takes one ``lerp_`` pass instead of two.
``torch.compile`` of the same steps was measured slower on CPU (its kernels read ``g`` three times),
so it is not used. ``Adafactor(..., fused=True)`` (opt-in) hands fp32 CPU matrices to a C++ kernel
instead (:mod:`optsched.optim.adafactor_fused`): one pass over ``g`` (and ``p``) for the statistics,
one for the update, none over a workspace: 1.6-1.9x the eager step, 2.7-4.0x transformers'.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from optsched._validation import check_bool, check_number

__all__ = [
    "Adafactor",
    "AdafactorSchedule",
    "adafactor_reference_update",
    "get_adafactor_schedule",
    "relative_step_size",
]

logger = logging.getLogger(__name__)

#: Parameter dtypes that are updated through an fp32 copy (transformers' behaviour).
LOW_PRECISION_DTYPES = (torch.float16, torch.bfloat16)

#: The hyperparameters a param group carries, with transformers' defaults.
DEFAULTS: dict[str, Any] = {
    "lr": None,
    "eps": (1e-30, 1e-3),
    "clip_threshold": 1.0,
    "decay_rate": -0.8,
    "beta1": None,
    "weight_decay": 0.0,
    "scale_parameter": True,
    "relative_step": True,
    "warmup_init": False,
}

# State keys holding tensors that follow the gradient's dtype and device.
_MOMENT_KEYS = ("exp_avg", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq")


# ---------------------------------------------------------------------------------------------------
# Hyperparameters
# ---------------------------------------------------------------------------------------------------


def _check_eps(field: str, eps: Any) -> tuple[float, float]:
    if not isinstance(eps, Sequence) or isinstance(eps, (str, bytes)):
        raise TypeError(
            f"{field} must be a pair of numbers (eps_square_grad, eps_param_scale), "
            f"got {type(eps).__name__} {eps!r}."
        )
    if len(eps) != 2:
        raise ValueError(
            f"{field}={eps!r} has {len(eps)} values; accepted: a pair (eps_square_grad, eps_param_scale) "
            "such as (1e-30, 1e-3)."
        )
    eps1 = check_number(f"{field}[0]", eps[0], low=0.0)
    eps2 = check_number(f"{field}[1]", eps[1], low=0.0)
    return eps1, eps2


def check_adafactor_hyperparameters(group: Mapping[str, Any], where: str = "") -> None:
    """Validate one set of Adafactor hyperparameters (constructor arguments or a param group).

    Checks the ranges transformers leaves unchecked (a positive ``decay_rate`` would make
    ``beta2_t`` negative) and the combinations it rejects, with the same wording.

    Args:
        group: a mapping with the keys of :data:`DEFAULTS`.
        where: a prefix naming the place (``"param_groups[1]: "``) for the messages.

    Raises:
        TypeError: a value of the wrong type.
        ValueError: a value out of range or an incompatible combination.
    """
    relative_step = check_bool(f"{where}relative_step", group["relative_step"])
    check_bool(f"{where}scale_parameter", group["scale_parameter"])
    warmup_init = check_bool(f"{where}warmup_init", group["warmup_init"])
    lr = check_number(f"{where}lr", group["lr"], low=0.0, allow_none=True)
    _check_eps(f"{where}eps", group["eps"])
    check_number(f"{where}clip_threshold", group["clip_threshold"], low=0.0, low_open=True)
    check_number(f"{where}decay_rate", group["decay_rate"], high=0.0)
    check_number(f"{where}beta1", group["beta1"], low=0.0, high=1.0, high_open=True, allow_none=True)
    check_number(f"{where}weight_decay", group["weight_decay"], low=0.0)
    check_bool(f"{where}fused", group.get("fused", False))
    if lr is not None and relative_step:
        raise ValueError(
            f"Cannot combine manual `lr` and `relative_step=True` options: {where}lr={lr!r} would be "
            "ignored, because relative_step=True makes Adafactor compute its own step size. Accepted: "
            "lr=None with relative_step=True, or relative_step=False (and scale_parameter=False for "
            "a plain external learning rate) with an lr."
        )
    if warmup_init and not relative_step:
        raise ValueError(
            f"`warmup_init=True` requires `relative_step=True`: {where}warmup_init=True was given with "
            "relative_step=False. Accepted: warmup_init=False, or relative_step=True with lr=None."
        )
    if lr is None and not relative_step:
        raise ValueError(
            f"{where}lr=None with relative_step=False leaves Adafactor without a step size; accepted: "
            "an lr such as 1e-3 with relative_step=False, or relative_step=True (lr=None)."
        )


def relative_step_size(step: int, *, lr: float | None, relative_step: bool, warmup_init: bool) -> float:
    """The step size before parameter scaling: ``rho_t`` of the paper, or the external ``lr``.

    ``min(1e-6 * t if warmup_init else 1e-2, 1 / sqrt(t))`` when ``relative_step``; else ``lr``.
    At ``t = 1`` that is ``1e-2`` (``1e-6`` with ``warmup_init``); it stays ``1e-2`` until
    ``t = 10_000``, then decays as ``1 / sqrt(t)``. With ``warmup_init`` it rises linearly until
    ``1e-6 * t = 1 / sqrt(t)``, at ``t = 10_000`` as well.
    """
    if not relative_step:
        return lr  # type: ignore[return-value]
    min_step = 1e-6 * step if warmup_init else 1e-2
    return min(min_step, 1.0 / math.sqrt(step))


def _group_step_size(group: Mapping[str, Any], step: int) -> float:
    """:func:`relative_step_size` with a param group's ``lr``, ``relative_step`` and ``warmup_init``."""
    return relative_step_size(step, lr=group["lr"], relative_step=group["relative_step"], warmup_init=group["warmup_init"])


def _rms(tensor: Tensor) -> Tensor:
    return tensor.norm(2) / (tensor.numel() ** 0.5)


def _inv_sqrt_numel(tensor: Tensor) -> float:
    # An empty tensor has a zero norm; 1 keeps its RMS at 0 instead of dividing by zero.
    return max(tensor.numel(), 1) ** -0.5


# ---------------------------------------------------------------------------------------------------
# Reference implementation
# ---------------------------------------------------------------------------------------------------


def adafactor_reference_update(
    param: Tensor,
    grad: Tensor,
    state: Mapping[str, Any],
    *,
    lr: float | None = None,
    eps: tuple[float, float] = (1e-30, 1e-3),
    clip_threshold: float = 1.0,
    decay_rate: float = -0.8,
    beta1: float | None = None,
    weight_decay: float = 0.0,
    scale_parameter: bool = True,
    relative_step: bool = True,
    warmup_init: bool = False,
) -> tuple[Tensor, dict[str, Any]]:
    """One Adafactor step, written as the formulas of the module docstring; a pure function.

    Args:
        param: the parameter before the step (not modified).
        grad: its gradient (not modified).
        state: the parameter's state (``{}`` before the first step); not modified.
        lr, eps, clip_threshold, decay_rate, beta1, weight_decay, scale_parameter, relative_step,
            warmup_init: the hyperparameters, as for :class:`Adafactor`.

    Returns:
        ``(new_param, new_state)``: the parameter after the step, in its own dtype, and the new
        state with transformers' keys (``step``, ``RMS``, ``exp_avg_sq_row``/``exp_avg_sq_col`` for
        tensors of two or more dims, else ``exp_avg_sq``, and ``exp_avg`` when ``beta1`` is set).
        Moments are fp32 for fp16/bf16 parameters.
    """
    g = grad.float() if grad.dtype in LOW_PRECISION_DTYPES else grad
    p = param.float() if param.dtype in LOW_PRECISION_DTYPES else param
    step = state.get("step", 0) + 1
    new_state: dict[str, Any] = {"step": step, "RMS": _rms(p)}

    rel_step = relative_step_size(step, lr=lr, relative_step=relative_step, warmup_init=warmup_init)
    param_scale = max(eps[1], new_state["RMS"]) if scale_parameter else 1.0
    step_lr = param_scale * rel_step

    beta2t = 1.0 - step**decay_rate
    squared = g * g + eps[0]
    if g.dim() >= 2:
        row = state.get("exp_avg_sq_row", torch.zeros_like(squared[..., 0]))
        col = state.get("exp_avg_sq_col", torch.zeros_like(squared[..., 0, :]))
        row = beta2t * row + (1.0 - beta2t) * squared.mean(dim=-1)
        col = beta2t * col + (1.0 - beta2t) * squared.mean(dim=-2)
        new_state["exp_avg_sq_row"], new_state["exp_avg_sq_col"] = row, col
        # V_hat = row col^T / mean(row), so 1/sqrt(V_hat) is an outer product of two rsqrt vectors.
        row_factor = torch.rsqrt(row / row.mean(dim=-1, keepdim=True)).unsqueeze(-1)
        col_factor = torch.rsqrt(col).unsqueeze(-2)
        update = g * row_factor * col_factor
    else:
        second_moment = state.get("exp_avg_sq", torch.zeros_like(squared))
        second_moment = beta2t * second_moment + (1.0 - beta2t) * squared
        new_state["exp_avg_sq"] = second_moment
        update = g * torch.rsqrt(second_moment)

    update = update / torch.clamp(_rms(update) / clip_threshold, min=1.0)
    update = step_lr * update
    if beta1 is not None:
        exp_avg = state.get("exp_avg", torch.zeros_like(g))
        update = new_state["exp_avg"] = beta1 * exp_avg + (1.0 - beta1) * update

    new_param = p - weight_decay * step_lr * p - update
    return new_param.to(param.dtype), new_state


# ---------------------------------------------------------------------------------------------------
# Fast path
# ---------------------------------------------------------------------------------------------------


def _foreach_rsqrt(tensors: list[Tensor]) -> list[Tensor]:
    """``torch._foreach_rsqrt`` (torch >= 2.5), else one ``rsqrt`` per tensor (torch 2.4): the same values."""
    fused = getattr(torch, "_foreach_rsqrt", None)
    return fused(tensors) if fused is not None else [t.rsqrt() for t in tensors]


def _weighted_column_sums(weights: Tensor, matrix: Tensor) -> Tensor:
    """``weights @ matrix`` for a few weight rows (``(..., k, R) @ (..., R, C)``), on every CPU thread.

    MKL runs a GEMM this thin on one thread (about 78 us per weight row for a 1536x1024 fp32 matrix in
    cache, the same on 1 or 2 threads). Split into one row block per thread, a batched GEMM spreads it
    over the threads and the partial sums are added: 0.55 of the time on 2 threads. Elsewhere (a
    GPU, one thread, rows that do not split evenly, stacks of matrices) it is one ``matmul``.
    """
    threads = torch.get_num_threads()
    n_rows = matrix.shape[-2]
    if matrix.device.type != "cpu" or matrix.dim() != 2 or threads < 2 or n_rows % threads or n_rows < 64 * threads:
        return torch.matmul(weights, matrix)
    block = n_rows // threads
    # (threads, k, block) @ (threads, block, C) -> (threads, k, C), summed over the blocks.
    split_weights = weights.view(weights.shape[0], threads, block).transpose(0, 1)
    return torch.bmm(split_weights, matrix.view(threads, block, matrix.shape[-1])).sum(dim=0)


class _Workspace:
    """Scratch tensors of one step, by (device, dtype), reused from matrix to matrix, then dropped.

    ``buffer``: the one full-size temporary of a matrix update (sized for the largest matrix, so it
    is allocated once and stays in cache); ``ones``: the first row of the weights whose GEMM with ``g**2``
    gives the column sums (:func:`_weighted_column_sums`).
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self._ones: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def buffer(self, like: Tensor, numel: int) -> Tensor:
        """A flat tensor of at least ``numel`` elements (contents undefined)."""
        key = (like.device, like.dtype)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buffer

    def ones(self, like: Tensor, numel: int) -> Tensor:
        """A flat tensor of at least ``numel`` ones."""
        key = (like.device, like.dtype)
        ones = self._ones.get(key)
        if ones is None or ones.numel() < numel:
            ones = self._ones[key] = torch.ones(numel, dtype=like.dtype, device=like.device)
        return ones


@dataclass
class _Slot:
    """One parameter taking part in a step: fp32 views/copies and its state."""

    param: Tensor
    p32: Tensor  # the parameter itself (fp32) or an fp32 copy (fp16/bf16)
    g32: Tensor
    state: dict[str, Any]
    step: int
    beta2t: float


def _moments_to(state: dict[str, Any], like: Tensor) -> None:
    # transformers moves moments to the gradient's dtype/device every step (`.to(grad)`); this is the
    # same, but only touches a tensor when it is not already there (a resumed fp16 run, a device move).
    for key in _MOMENT_KEYS:
        value = state.get(key)
        if value is not None and (value.dtype != like.dtype or value.device != like.device):
            state[key] = value.to(like)


def _init_state(state: dict[str, Any], grad: Tensor, factored: bool, use_first_moment: bool) -> None:
    if not state:
        state["step"] = 0
        state["RMS"] = 0
    if use_first_moment and "exp_avg" not in state:
        state["exp_avg"] = torch.zeros_like(grad)
    if factored and "exp_avg_sq_row" not in state:
        state["exp_avg_sq_row"] = torch.zeros(grad.shape[:-1], dtype=grad.dtype, device=grad.device)
        state["exp_avg_sq_col"] = torch.zeros(
            grad.shape[:-2] + grad.shape[-1:], dtype=grad.dtype, device=grad.device
        )
    if not factored and "exp_avg_sq" not in state:
        state["exp_avg_sq"] = torch.zeros_like(grad)


class Adafactor(Optimizer):
    """Adafactor with ``transformers.optimization.Adafactor``'s arguments, defaults and state.

    Memory: factored second moments (a row and a column vector) for tensors of two or more
    dimensions, a full one for vectors, plus a first moment when ``beta1`` is set. The learning rate
    is relative (``relative_step=True``, ``lr=None``: ``min(1e-2, 1/sqrt(t))`` scaled by the
    parameter's RMS) or external (``relative_step=False, scale_parameter=False, lr=...``, as
    transformers' Trainer builds it for ``optim="adafactor"``). See the module docstring for the
    update formula.

    Args:
        params: parameters or param groups (groups may override any hyperparameter below).
        lr: the external learning rate; must be ``None`` when ``relative_step=True``.
        eps: ``(eps_square_grad, eps_param_scale)``: added to the squared gradient, and the floor of
            the parameter RMS used by ``scale_parameter``.
        clip_threshold: the update's RMS is clipped to this (> 0).
        decay_rate: second-moment decay exponent: ``beta2_t = 1 - t ** decay_rate`` (<= 0).
        beta1: first-moment coefficient in ``[0, 1)``, or ``None`` for no first moment.
        weight_decay: decoupled decay, scaled by the step's learning rate: ``p -= wd * lr_t * p``.
        scale_parameter: multiply the step size by ``max(eps[1], RMS(p))``.
        relative_step: compute a time-dependent step size instead of the external ``lr``.
        warmup_init: with ``relative_step``, start the step size at ``1e-6`` and raise it linearly.
        fused: (keyword-only, optsched's) update fp32 CPU matrices with a fused C++ kernel
            (:mod:`optsched.optim.adafactor_fused`): two passes per matrix instead of eight, ~1.6x
            faster per step on CPU; built on first use (a C++ compiler and ``ninja``, ~20 s once).
            Same state, results equal to ~1e-6 relative; vectors and other tensors take the eager path.

    Raises:
        ValueError: a value out of range, ``lr`` with ``relative_step=True`` (transformers' message:
            "Cannot combine manual `lr` and `relative_step=True` options"), ``warmup_init`` without
            ``relative_step``, or neither an ``lr`` nor ``relative_step``.
        TypeError: a value of the wrong type.
        ImportError: ``fused=True`` where its C++ kernel cannot be built (no compiler or ninja).

    Differences from transformers, all deliberate: values are validated; a ``closure`` runs with
    gradients enabled (transformers runs it under ``no_grad``); the parameter RMS is only computed
    when ``scale_parameter`` needs it (``state["RMS"]`` keeps its last value otherwise); moments of
    fp16/bf16 parameters stay fp32 across ``load_state_dict`` (torch would cast them to the
    parameter's dtype).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(4, 3)
        >>> opt = Adafactor(model.parameters(), lr=1e-3, scale_parameter=False, relative_step=False)
        >>> model(torch.ones(2, 4)).sum().backward()
        >>> opt.step()
        >>> sorted(opt.state[model.weight])
        ['RMS', 'exp_avg_sq_col', 'exp_avg_sq_row', 'step']
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | None = None,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: float | None = None,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
        relative_step: bool = True,
        warmup_init: bool = False,
        *,
        fused: bool = False,
    ) -> None:
        defaults = {
            "lr": lr,
            "eps": eps,
            "clip_threshold": clip_threshold,
            "decay_rate": decay_rate,
            "beta1": beta1,
            "weight_decay": weight_decay,
            "scale_parameter": scale_parameter,
            "relative_step": relative_step,
            "warmup_init": warmup_init,
            "fused": fused,
        }
        check_adafactor_hyperparameters(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, filling in defaults, and validate its hyperparameters.

        Raises:
            ValueError: a bad hyperparameter, or ``fused=True`` with a parameter off the CPU.
            ImportError: ``fused=True`` and its kernel cannot be built here (no C++ compiler, no ninja).
        """
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        group = self.param_groups[index]
        check_adafactor_hyperparameters(group, where=f"param_groups[{index}]: ")
        if group["fused"]:
            for p in group["params"]:
                if p.device.type != "cpu":
                    raise ValueError(
                        f"param_groups[{index}]: fused=True runs a CPU kernel, got a parameter on {p.device}; "
                        "accepted: fused=False (the eager path runs on any device)."
                    )
            from optsched.optim.adafactor_fused import load_kernels

            load_kernels()  # here, not in the first step: a missing compiler is an error at construction

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A state dict saved by transformers (or before `fused` existed) has no "fused" in its groups:
        # keep the constructor's choice.
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("fused", self.defaults.get("fused", False))

    # transformers' helpers, kept with their signatures: AdafactorSchedule (ours and transformers')
    # calls `optimizer._get_lr(group, state)`.
    @staticmethod
    def _get_lr(param_group: Mapping[str, Any], param_state: Mapping[str, Any]) -> float | Tensor:
        rel_step_sz = _group_step_size(param_group, param_state["step"])
        param_scale = 1.0
        if param_group["scale_parameter"]:
            param_scale = max(param_group["eps"][1], param_state["RMS"])
        return param_scale * rel_step_sz

    @staticmethod
    def _get_options(param_group: Mapping[str, Any], param_shape: torch.Size) -> tuple[bool, bool]:
        factored = len(param_shape) >= 2
        use_first_moment = param_group["beta1"] is not None
        return factored, use_first_moment

    @staticmethod
    def _rms(tensor: Tensor) -> Tensor:
        return _rms(tensor)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict (ours or transformers'); fp16/bf16 parameters keep fp32 moments."""
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        restored = 0
        for saved_id, param in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if saved is None or param.dtype not in LOW_PRECISION_DTYPES:
                continue
            # torch casts every floating state tensor to the parameter's dtype; undo that for the
            # moments, which the step keeps in fp32.
            for key in _MOMENT_KEYS:
                if isinstance(saved.get(key), Tensor):
                    self.state[param][key] = saved[key].to(device=param.device, dtype=torch.float32)
                    restored += 1
        if restored:
            logger.debug("Adafactor.load_state_dict: kept %d fp16/bf16 parameter moments in fp32", restored)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step.

        Args:
            closure: re-evaluates the model and returns the loss (run with gradients enabled).

        Returns:
            The closure's loss, or ``None``.

        Raises:
            RuntimeError: a sparse gradient (as transformers and torch.optim).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # One flat buffer per (device, dtype), reused by every matrix of the step for its one full-size
        # temporary: it stays in cache from one matrix to the next and is freed after the step, so
        # the peak extra memory is the largest matrix (transformers' is four times that).
        workspace = _Workspace()
        for group in self.param_groups:
            slots = self._prepare(group)
            devices = {slot.p32.device for slot in slots}
            for device in devices:  # foreach kernels and stacking need one device
                on_device = [s for s in slots if s.p32.device == device] if len(devices) > 1 else slots
                self._update(group, on_device, workspace)
            for slot in slots:
                if slot.p32 is not slot.param:
                    slot.param.copy_(slot.p32)
        return loss

    def _prepare(self, group: dict[str, Any]) -> list[_Slot]:
        """Collect the parameters with a gradient; initialise or convert their state; count the step."""
        slots = []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(
                    "Adafactor does not support sparse gradients; got a sparse gradient for a parameter "
                    f"of shape {tuple(p.shape)}. Use dense gradients (e.g. nn.Embedding(sparse=False))."
                )
            grad = p.grad.float() if p.grad.dtype in LOW_PRECISION_DTYPES else p.grad
            p32 = p.float() if p.dtype in LOW_PRECISION_DTYPES else p
            state = self.state[p]
            factored, use_first_moment = self._get_options(group, grad.shape)
            _init_state(state, grad, factored, use_first_moment)
            _moments_to(state, grad)
            state["step"] += 1
            beta2t = 1.0 - math.pow(state["step"], group["decay_rate"])
            slots.append(_Slot(p, p32, grad, state, state["step"], beta2t))
        return slots

    def _learning_rates(self, group: dict[str, Any], slots: list[_Slot]) -> Tensor:
        """``lr_t`` of each slot as one fp32 tensor (one RMS kernel for the whole group)."""
        rel = [_group_step_size(group, s.step) for s in slots]
        device = slots[0].p32.device
        # fp32 like transformers' (an fp32 RMS times a Python float); fp64 when a parameter is fp64.
        dtype = torch.float64 if any(s.p32.dtype == torch.float64 for s in slots) else torch.float32
        rel_t = torch.tensor(rel, dtype=dtype, device=device)
        if not group["scale_parameter"]:
            return rel_t
        norms = torch.stack(torch._foreach_norm([s.p32 for s in slots])).to(dtype)
        inv_sqrt_numel = torch.tensor([_inv_sqrt_numel(s.p32) for s in slots], dtype=dtype, device=device)
        rms = norms.mul_(inv_sqrt_numel)
        for slot, value in zip(slots, rms.unbind()):
            slot.state["RMS"] = value
        return rms.clamp(min=group["eps"][1]).mul_(rel_t)

    @staticmethod
    def _matrix_learning_rate(group: dict[str, Any], slot: _Slot) -> Tensor | float:
        """``lr_t`` of one matrix, its RMS taken right before its own update.

        Read there, the parameter is still in cache when the update reads it again, so it costs one
        pass from memory per step instead of two; and a BLAS ``dot`` (``||p||**2``) streams faster
        than torch's norm kernel. Together 10-12% of the step with ``scale_parameter`` (50M fp32
        parameters, this project's CPU). The dot sums in another order than transformers'
        ``p.norm(2)``: within 1e-5 relative (closer to the exact value than torch's fp32 norm here).
        """
        rel = _group_step_size(group, slot.step)
        if not group["scale_parameter"]:
            return rel
        p = slot.p32
        if p.is_contiguous() and p.is_floating_point():
            flat = p.view(-1)
            norm = torch.dot(flat, flat).sqrt_()
        else:
            norm = torch.linalg.vector_norm(p)
        rms = norm.mul_(_inv_sqrt_numel(p))
        slot.state["RMS"] = rms
        return rms.clamp(min=group["eps"][1]).mul_(rel)

    def _update(self, group: dict[str, Any], slots: list[_Slot], workspace: _Workspace) -> None:
        if group.get("fused", False):
            from optsched.optim.adafactor_fused import eligible

            rest = []
            for slot in slots:
                if eligible(slot.p32, slot.g32):
                    self._update_fused(group, slot)
                else:
                    rest.append(slot)
            slots = rest
        if not slots:
            return
        matrices = [s for s in slots if s.g32.dim() >= 2]
        vectors = [s for s in slots if s.g32.dim() < 2]
        if matrices:
            largest = max(s.g32.numel() for s in matrices)
            rows = max(s.g32.shape[-2] for s in matrices)
            for slot in matrices:
                work = workspace.buffer(slot.g32, largest)
                ones = workspace.ones(slot.g32, rows)
                self._update_factored(group, slot, work, ones)
        if vectors:
            self._update_unfactored(group, vectors, self._learning_rates(group, vectors))

    @staticmethod
    def _update_factored(group: dict[str, Any], slot: _Slot, buffer: Tensor, ones: Tensor) -> None:
        """One matrix (or stack of matrices): two passes over ``g``, one over ``p``, the rest in cache.

        With ``S = g**2`` (in the workspace), ``r`` the row factor and ``c = rsqrt(col)``:

        * statistics: ``S.sum(-1)``, which gives ``r``; then the column sums and the update's squared
          norm from one GEMM over ``S`` (:func:`_weighted_column_sums`):
          ``[1; r**2] @ S = [sum_i S_ij; sum_i r_i**2 S_ij]`` and
          ``||u||**2 = sum_j (sum_i r_i**2 S_ij) / col_j``: no scaled copy of ``g``; split by rows over
          the CPU threads, 0.55 of the two GEMVs' time on 2 threads (the same on one thread);
        * the update: the workspace is overwritten with ``g * c`` and ``p`` gets one
          ``addcmul_(g * c, coef)``, ``coef = lr_t * r / clip`` broadcast over the columns: g and the
          workspace read once, p read and written once. With ``beta1`` the workspace becomes the
          update ``u`` and ``exp_avg.lerp_(u, 1 - beta1)`` is the one pass over the first moment.
        """
        g, p, state = slot.g32, slot.p32, slot.state
        n_rows, n_cols = max(g.shape[-2], 1), max(g.shape[-1], 1)  # max: an empty tensor divides by 1
        eps1 = group["eps"][0]
        beta2t = slot.beta2t
        rho = 1.0 - beta2t
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        work = buffer[: g.numel()].view(g.shape)

        # mean(g**2 + eps1) over a dim == sum of squares / size + eps1, so eps1 is added to the small
        # statistics, not to a full-size tensor.
        squared = torch.mul(g, g, out=work)
        row.mul_(beta2t).add_(squared.sum(dim=-1), alpha=rho / n_cols).add_(rho * eps1)
        row_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_()

        weights = torch.stack((ones[: g.shape[-2]].expand_as(row_factor), row_factor.square()), dim=-2)
        col_sums, weighted = _weighted_column_sums(weights, squared).unbind(dim=-2)
        col.mul_(beta2t).add_(col_sums, alpha=rho / n_rows).add_(rho * eps1)
        update_sq_norm = weighted.div_(col).sum()
        clip = (update_sq_norm.sqrt_() * (_inv_sqrt_numel(g) / group["clip_threshold"])).clamp_(min=1.0)
        lr = Adafactor._matrix_learning_rate(group, slot)
        # Everything per row folded into one vector (lr_t * row_factor / clip), broadcast over the
        # columns; the column factor is applied to g in the workspace (S is no longer needed).
        coef = row_factor.mul_(lr / clip).unsqueeze(-1)
        scaled = torch.mul(g, col.rsqrt().unsqueeze(-2), out=work)

        if group["weight_decay"] != 0:
            # transformers' exact expression: p + (-wd * lr_t) * p rounds like it, unlike p * (1 - wd*lr_t).
            p.add_(p, alpha=-group["weight_decay"] * lr)
        beta1 = group["beta1"]
        if beta1 is not None:
            # The update itself in the workspace, so that the first moment takes one pass:
            # lerp(m, u, 1 - beta1) = beta1 * m + (1 - beta1) * u (transformers: mul_ then add_, two).
            exp_avg = state["exp_avg"]
            exp_avg.lerp_(scaled.mul_(coef), 1.0 - beta1)
            p.sub_(exp_avg)
        else:
            p.addcmul_(scaled, coef, value=-1.0)

    @staticmethod
    def _update_fused(group: dict[str, Any], slot: _Slot) -> None:
        """One fp32 CPU matrix through the fused kernel (:mod:`optsched.optim.adafactor_fused`): one pass
        for the statistics (and the parameter's RMS), one for the update."""
        from optsched.optim.adafactor_fused import load_kernels

        kernels = load_kernels()
        g, p, state = slot.g32, slot.p32, slot.state
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        eps1 = group["eps"][0]
        update_sq, param_sq, row_mean = kernels.stats(
            g, p, row, col, slot.beta2t, eps1, bool(group["scale_parameter"])
        )
        if group["scale_parameter"]:
            state["RMS"] = torch.tensor(math.sqrt(param_sq) * _inv_sqrt_numel(p), dtype=torch.float32)
        lr = float(Adafactor._get_lr(group, state))  # transformers' lr_t, from the RMS just stored
        clip = max(1.0, math.sqrt(update_sq) * _inv_sqrt_numel(g) / group["clip_threshold"])
        # lr_t * r_i / clip with r_i = sqrt(mean(row) / row_i): the kernel applies 1 / sqrt(row_i).
        scale = lr / clip * math.sqrt(row_mean)
        decay = -group["weight_decay"] * lr
        if group["beta1"] is None:
            kernels.update(p, g, row, col, scale, decay)
        else:
            kernels.update_momentum(p, g, row, col, state["exp_avg"], scale, decay, group["beta1"])

    @staticmethod
    def _update_unfactored(group: dict[str, Any], slots: list[_Slot], lrs: Tensor) -> None:
        grads = [s.g32 for s in slots]
        params = [s.p32 for s in slots]
        second = [s.state["exp_avg_sq"] for s in slots]
        beta2s = [s.beta2t for s in slots]
        rhos = [1.0 - b for b in beta2s]
        eps1 = group["eps"][0]
        torch._foreach_mul_(second, beta2s)
        torch._foreach_addcmul_(second, grads, grads, rhos)
        torch._foreach_add_(second, [r * eps1 for r in rhos])
        updates = _foreach_rsqrt(second)
        torch._foreach_mul_(updates, grads)

        norms = torch.stack(torch._foreach_norm(updates))
        inv_sqrt_numel = torch.tensor(
            [_inv_sqrt_numel(u) for u in updates], dtype=norms.dtype, device=norms.device
        )
        clip = norms.mul_(inv_sqrt_numel).div_(group["clip_threshold"]).clamp_(min=1.0)
        coefs = lrs / clip
        torch._foreach_mul_(updates, list(coefs.unbind()))

        if group["weight_decay"] != 0:
            for param, alpha in zip(params, (-group["weight_decay"] * lrs).tolist()):
                param.add_(param, alpha=alpha)
        beta1 = group["beta1"]
        if beta1 is not None:
            exp_avgs = [s.state["exp_avg"] for s in slots]
            torch._foreach_mul_(exp_avgs, beta1)
            torch._foreach_add_(exp_avgs, updates, alpha=1.0 - beta1)
            updates = exp_avgs
        torch._foreach_sub_(params, updates)


# ---------------------------------------------------------------------------------------------------
# Proxy schedule
# ---------------------------------------------------------------------------------------------------


class AdafactorSchedule(LambdaLR):
    """A proxy scheduler that reports the learning rate Adafactor computes itself.

    With ``relative_step=True`` Adafactor schedules its own step size, but a training loop (or the
    Trainer's logging) may want a scheduler: this one returns ``initial_lr`` for every group until
    the first optimizer step, then each group's ``lr_t`` of its last step (transformers'
    ``AdafactorSchedule``). It writes that value into ``group["lr"]``, which a relative-step group
    ignores.

    Args:
        optimizer: an :class:`Adafactor` (or transformers' ``Adafactor``: anything with its
            ``_get_lr(group, state)``) whose groups all use ``relative_step=True``.
        initial_lr: the value reported before the first step (``>= 0``).

    Raises:
        TypeError: ``optimizer`` has no ``_get_lr``.
        ValueError: a group with ``relative_step=False``: the value written into its ``lr`` would
            replace the external learning rate (with ``initial_lr=0.0`` it would stop training);
            use a regular scheduler (``optsched.get_scheduler``) there.

    Differences from transformers: a group is read from its first parameter that has been stepped
    (transformers reads the first parameter, and drops the group, misaligning the others, when that
    one has no gradient); values are floats, not 0-dim tensors.
    """

    def __init__(self, optimizer: Optimizer, initial_lr: float = 0.0) -> None:
        if not callable(getattr(optimizer, "_get_lr", None)):
            raise TypeError(
                "AdafactorSchedule needs an Adafactor optimizer (with `_get_lr`), "
                f"got {type(optimizer).__name__}."
            )
        initial_lr = check_number("initial_lr", initial_lr, low=0.0)
        for index, group in enumerate(optimizer.param_groups):
            if not group.get("relative_step", False):
                raise ValueError(
                    f"param_groups[{index}] has relative_step={group.get('relative_step')!r}; "
                    "AdafactorSchedule only reports the step size Adafactor computes with "
                    "relative_step=True, and would overwrite this group's lr="
                    f"{group.get('lr')!r}. Accepted: relative_step=True groups; for an external lr use "
                    "a regular scheduler such as optsched.get_scheduler('constant', optimizer)."
                )

        def lr_lambda(_: int) -> float:
            return initial_lr

        for group in optimizer.param_groups:
            group["initial_lr"] = initial_lr
        super().__init__(optimizer, lr_lambda)
        for group in optimizer.param_groups:
            del group["initial_lr"]

    def get_lr(self) -> list[float]:
        """Each group's last ``lr_t`` (``initial_lr`` for a group not stepped yet)."""
        opt = self.optimizer
        lrs = []
        for group, base_lr in zip(opt.param_groups, self.base_lrs):
            state = next((opt.state[p] for p in group["params"] if opt.state.get(p)), None)
            lr = base_lr if state is None else opt._get_lr(group, state)  # type: ignore[attr-defined]
            lrs.append(float(lr))
        return lrs


def get_adafactor_schedule(optimizer: Optimizer, initial_lr: float = 0.0) -> AdafactorSchedule:
    """A proxy schedule for :class:`Adafactor` (transformers' function of the same name)."""
    return AdafactorSchedule(optimizer, initial_lr)
