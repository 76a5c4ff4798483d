"""Muon for the hidden matrices, AdamW for everything else, in one optimizer (``optim="muon"``).

Muon (Jordan et al., 2024) orthogonalises the momentum of a 2-D weight matrix with a few Newton-Schulz
iterations before applying it. It is meant for the hidden layers only; embeddings, the output head and
every tensor that is not a matrix (biases, norm gains) should be trained by a standard method. Torch's
own ``torch.optim.Muon`` (torch >= 2.9) refuses anything that is not 2-D and leaves the split to the
user, so a training loop ends up with two optimizers, two schedulers and two checkpoints.
:class:`MuonWithAdamW` is one ``torch.optim.Optimizer`` whose ``param_groups`` each carry a ``use_muon``
flag: its ``step()`` runs torch's functional Muon update on the ``use_muon=True`` groups (on torch
2.4-2.8, which have none, optsched's copy of it: same operations, same bits) and torch's functional
AdamW update on the others. So any ``LRScheduler`` (torch's or optsched's) that edits
``param_groups[i]["lr"]`` drives both parts, and ``state_dict()``/``load_state_dict()`` round-trip exactly.

The split rules (:func:`classify_muon_params`, applied by :func:`split_muon_groups`)
    A parameter goes to **AdamW** when the first of these rules matches, else to **Muon**:

    1. ``not_2d``: it is not a 2-D tensor (biases, norm weights, conv kernels, scalars).
    2. ``embedding``: it is the weight of an ``nn.Embedding`` / ``nn.EmbeddingBag``.
    3. ``tied_to_embedding``: it is the same tensor as an embedding's weight (a tied LM head).
    4. ``output_head``: the module that owns it is named one of :data:`DEFAULT_HEAD_NAMES`
       (``lm_head``, ``head``, ``classifier``, ``output``, ``score``, ``qa_outputs``, ``embed_out``).
       Only the owning module's own name counts, so BERT's hidden ``encoder.layer.0.output.dense``
       stays on Muon while a Llama-style top-level ``output`` goes to AdamW. Pass ``head_names`` to
       change the list (e.g. for an ``nn.Sequential`` whose last layer is called ``"4"``).

    A param group may carry ``use_muon: True`` or ``False`` (issue 5's parameter rules set it): then
    the flag decides for every tensor of the group, the rules above are not consulted. ``use_muon=True``
    on a tensor that is not 2-D is a ``ValueError`` naming the parameter, since Muon's
    orthogonalisation is only defined for matrices.

Hyper-parameters (group keys; a group's own value always wins over the constructor default)
    Muon groups: ``lr``, ``weight_decay``, ``momentum`` (0.95), ``nesterov`` (True), ``ns_steps`` (5),
    ``ns_coefficients`` ((3.4445, -4.7750, 2.0315)), ``eps`` (1e-7, Newton-Schulz norm floor),
    ``adjust_lr_fn`` (``None``/``"original"``: ``lr * sqrt(max(1, A/B))``; ``"match_rms_adamw"``:
    ``lr * 0.2 * sqrt(max(A, B))`` for an ``A x B`` matrix), exactly torch's semantics::

        B_t = momentum * B_{t-1} + (1 - momentum) * g_t
        U_t = NS(g_t + momentum * (B_t - g_t)) if nesterov else NS(B_t)
        W_t = W_{t-1} * (1 - lr * weight_decay) - adjust(lr, shape) * U_t

    AdamW groups: ``lr``, ``weight_decay``, ``betas`` ((0.9, 0.999)), ``eps`` (1e-8), ``amsgrad``
    (False), ``foreach`` (None: torch's choice), exactly ``torch.optim.AdamW``.
    A key of the other algorithm in a group (``momentum`` on an AdamW group, ``betas`` on a Muon
    group) is a ``ValueError``; :func:`split_muon_groups` drops such keys from the half they do not
    apply to, so a rule that sets ``momentum`` for a whole block reaches only its Muon matrices.

From TrainingArguments (:func:`build_muon`, :func:`muon_kwargs_from_args`)
    ``learning_rate`` is the lr of **both** parts and ``weight_decay`` the decay of the ``decay``
    groups of both; ``adam_beta1/2`` and ``adam_epsilon`` go to the AdamW part. Because a single lr
    drives both parts, the builder's default ``adjust_lr_fn`` is ``"match_rms_adamw"`` (Moonshot's
    scaling, which makes Muon's update RMS match AdamW's so an AdamW-tuned lr and decay carry over);
    torch's own default ``"original"`` expects lr ~ 0.02, which would be far too large for AdamW.
    ``optim_args`` keys (:data:`MUON_OPTIM_ARGS`): ``momentum``, ``nesterov``, ``ns_steps``,
    ``adjust_lr_fn``, ``muon_eps``, and for the AdamW part either ``adamw_lr`` (an absolute lr for
    AdamW groups that carry no ``lr`` of their own) or ``adamw_lr_ratio`` (multiplies the lr of every
    AdamW group, so it composes with layer-wise decay and lr multipliers), not both.

State and checkpoints
    ``state[p]`` holds ``momentum_buffer`` for a Muon tensor (as ``torch.optim.Muon``) and ``step``,
    ``exp_avg``, ``exp_avg_sq`` (+ ``max_exp_avg_sq``) for an AdamW tensor (as ``torch.optim.AdamW``).
    ``load_state_dict`` refuses a checkpoint whose groups' ``use_muon`` flags differ from the current
    ones (the states would not fit the algorithm). Fused and capturable AdamW are not supported here.

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.embed = nn.Embedding(10, 8)
    ...         self.hidden = nn.Linear(8, 8)
    ...         self.head = nn.Linear(8, 10)
    >>> net = Net()
    >>> opt = build_muon(net, lr=1e-3, weight_decay=0.0)
    >>> for group in opt.param_groups:
    ...     print(group["name"], group["use_muon"], group["param_names"])
    all/muon True ['hidden.weight']
    all/adamw False ['embed.weight', 'hidden.bias', 'head.weight', 'head.bias']
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from optsched._validation import check_bool, check_choice, check_int, check_number

__all__ = [
    "DEFAULT_HEAD_NAMES",
    "MUON_OPTIM_ARGS",
    "MUON_SPLIT_RULES",
    "MuonDecision",
    "MuonWithAdamW",
    "build_muon",
    "classify_muon_params",
    "muon_builder",
    "muon_kwargs_from_args",
    "muon_spec",
    "muon_state_bytes",
    "prepare_muon",
    "split_muon_groups",
]

logger = logging.getLogger(__name__)

#: Names of the module that owns a parameter which mark it as an output head (AdamW, not Muon).
DEFAULT_HEAD_NAMES: tuple[str, ...] = (
    "lm_head",
    "head",
    "classifier",
    "output",
    "score",
    "qa_outputs",
    "embed_out",
)

# torch.optim.Muon's defaults (Keller Jordan's constants), repeated so they are documented here.
_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
_ADJUST_LR_FNS = ("original", "match_rms_adamw")

_MUON_ONLY_KEYS = frozenset({"momentum", "nesterov", "ns_coefficients", "ns_steps", "adjust_lr_fn"})
_ADAMW_ONLY_KEYS = frozenset({"betas", "amsgrad", "foreach"})

#: ``optim_args`` accepted by ``optim="muon"`` and their types (for ``parse_optim_args``).
MUON_OPTIM_ARGS: dict[str, type] = {
    "momentum": float,
    "nesterov": bool,
    "ns_steps": int,
    "adjust_lr_fn": str,
    "muon_eps": float,
    "adamw_lr": float,
    "adamw_lr_ratio": float,
}


# --------------------------------------------------------------------------------------------------
# The split
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MuonDecision:
    """Where one parameter goes and why.

    Attributes:
        use_muon: True for Muon, False for AdamW.
        reason: the rule that decided (``"not_2d"``, ``"embedding"``, ``"tied_to_embedding"``,
            ``"output_head"``, ``"hidden_matrix"``, or ``"group_flag"`` when a group's ``use_muon`` did).
    """

    use_muon: bool
    reason: str


@dataclass(frozen=True)
class _ParamContext:
    """What the split rules may look at for one parameter."""

    name: str
    param: torch.Tensor
    owner: nn.Module | None
    owner_name: str
    embedding_weight_ids: frozenset[int]
    head_names: frozenset[str]


def _is_not_2d(ctx: _ParamContext) -> bool:
    return ctx.param.ndim != 2


def _is_embedding(ctx: _ParamContext) -> bool:
    return isinstance(ctx.owner, (nn.Embedding, nn.EmbeddingBag))


def _is_tied_to_embedding(ctx: _ParamContext) -> bool:
    # The same tensor object serves an embedding elsewhere (GPT-2's lm_head.weight is wte.weight).
    return id(ctx.param) in ctx.embedding_weight_ids


def _is_output_head(ctx: _ParamContext) -> bool:
    # Only the owning module's own name: "encoder.layer.0.output.dense" is a hidden layer.
    return ctx.owner_name.rsplit(".", 1)[-1] in ctx.head_names


#: Ordered rules sending a parameter to AdamW; the first match decides, no match means Muon.
MUON_SPLIT_RULES: tuple[tuple[str, Callable[[_ParamContext], bool]], ...] = (
    ("not_2d", _is_not_2d),
    ("embedding", _is_embedding),
    ("tied_to_embedding", _is_tied_to_embedding),
    ("output_head", _is_output_head),
)


def _decide(ctx: _ParamContext) -> MuonDecision:
    for reason, matches in MUON_SPLIT_RULES:
        if matches(ctx):
            return MuonDecision(False, reason)
    return MuonDecision(True, "hidden_matrix")


def _check_head_names(head_names: Iterable[str]) -> frozenset[str]:
    if isinstance(head_names, str):
        raise TypeError(f"head_names must be a list of module names, got the string {head_names!r}.")
    names = list(head_names)
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"head_names must hold strings, got {type(name).__name__} {name!r}.")
    return frozenset(names)


def classify_muon_params(
    model: nn.Module, head_names: Iterable[str] = DEFAULT_HEAD_NAMES
) -> dict[str, MuonDecision]:
    """Decide Muon or AdamW for every trainable parameter of ``model`` by the module's split rules.

    Args:
        model: the model; tied parameters appear once, under their first name (as
            ``model.named_parameters()``), frozen ones not at all.
        head_names: names of modules that are output heads (see :data:`DEFAULT_HEAD_NAMES`).

    Returns:
        ``{parameter name: MuonDecision}`` in ``named_parameters()`` order.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    heads = _check_head_names(head_names)
    modules = dict(model.named_modules(remove_duplicate=False))
    embedding_ids = frozenset(
        id(m.weight) for m in modules.values() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))
    )
    decisions: dict[str, MuonDecision] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        owner_name = name.rsplit(".", 1)[0] if "." in name else ""
        ctx = _ParamContext(name, param, modules.get(owner_name), owner_name, embedding_ids, heads)
        decisions[name] = _decide(ctx)
    return decisions


def _names_by_id(model: nn.Module) -> dict[int, str]:
    names: dict[int, str] = {}
    for name, param in model.named_parameters():
        names.setdefault(id(param), name)
    return names


def _group_names(
    group: Mapping[str, Any], params: list[torch.Tensor], names_by_id: dict[int, str], index: int
) -> list[str]:
    if "param_names" in group:
        names = list(group["param_names"])
        if len(names) != len(params):
            raise ValueError(
                f"param_groups[{index}] has {len(params)} params but {len(names)} param_names; "
                "accepted: one name per parameter, in the same order."
            )
        return names
    names = []
    for param in params:
        if id(param) not in names_by_id:
            raise ValueError(
                f"param_groups[{index}] holds a parameter of shape {tuple(param.shape)} that is not a "
                "parameter of the model; accepted: parameters of the model passed to split_muon_groups."
            )
        names.append(names_by_id[id(param)])
    return names


def _half(group: Mapping[str, Any], use_muon: bool, params: list, names: list[str]) -> dict:
    foreign = _ADAMW_ONLY_KEYS if use_muon else _MUON_ONLY_KEYS
    half = {k: v for k, v in group.items() if k not in foreign}
    half.update(
        params=params,
        param_names=names,
        use_muon=use_muon,
        name=f"{group.get('name', 'group')}/{'muon' if use_muon else 'adamw'}",
    )
    return half


def split_muon_groups(
    model: nn.Module,
    param_groups: Sequence[Mapping[str, Any]] | None = None,
    *,
    head_names: Iterable[str] = DEFAULT_HEAD_NAMES,
) -> list[dict[str, Any]]:
    """Split param groups (the param-group contract) into Muon and AdamW halves, each with ``use_muon``.

    Each input group becomes up to two groups, Muon half first, named ``"<name>/muon"`` and
    ``"<name>/adamw"`` (an empty half is left out). All other keys are copied, except keys of the
    other algorithm (``momentum``/``nesterov``/``ns_steps``/... on the AdamW half, ``betas``/...
    on the Muon half). A group that already carries ``use_muon`` is kept whole, under its own name,
    after checking that ``use_muon=True`` holds only 2-D tensors.

    Args:
        model: the model the groups were built from (to find embeddings, tied weights and heads).
        param_groups: groups with ``params`` and optionally ``param_names``, ``name``,
            ``weight_decay``, ``lr``, ``use_muon``; ``None`` means one group ``"all"`` of every
            trainable parameter.
        head_names: module names treated as output heads (see :data:`DEFAULT_HEAD_NAMES`).

    Returns:
        New group dicts (the input is not modified), each with ``params``, ``param_names``,
        ``name`` and ``use_muon``.

    Raises:
        ValueError: ``use_muon=True`` on a tensor that is not 2-D (the message names it), a
            parameter not in ``model``, or ``param_names`` of the wrong length.
        TypeError: ``use_muon`` is not a bool, a group is not a mapping.
    """
    decisions = classify_muon_params(model, head_names)
    names_by_id = _names_by_id(model)
    if param_groups is None:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        names = [n for n, _ in named]
        param_groups = [{"params": [p for _, p in named], "param_names": names, "name": "all"}]
    if isinstance(param_groups, Mapping) or not isinstance(param_groups, Sequence):
        raise TypeError(f"param_groups must be a list of dicts, got {type(param_groups).__name__}.")

    out: list[dict[str, Any]] = []
    for index, group in enumerate(param_groups):
        if not isinstance(group, Mapping):
            raise TypeError(f"param_groups[{index}] must be a dict, got {type(group).__name__}.")
        params = list(group["params"])
        names = _group_names(group, params, names_by_id, index)
        if "use_muon" in group:
            flag = check_bool(f"param_groups[{index}]['use_muon']", group["use_muon"])
            if flag:
                _check_all_2d(params, names, f"param_groups[{index}] ({group.get('name', 'unnamed')!r})")
            # Kept whole and as given: a key of the other algorithm is the optimizer's error to raise.
            out.append({**group, "params": params, "param_names": names, "use_muon": flag})
            continue
        parts: dict[bool, tuple[list, list[str]]] = {True: ([], []), False: ([], [])}
        for param, name in zip(params, names):
            decision = decisions.get(name) or _decide_unknown(model, name, param, head_names)
            parts[decision.use_muon][0].append(param)
            parts[decision.use_muon][1].append(name)
        for use_muon in (True, False):
            if parts[use_muon][0]:
                out.append(_half(group, use_muon, *parts[use_muon]))
    n_muon = sum(len(g["params"]) for g in out if g["use_muon"])
    n_all = sum(len(g["params"]) for g in out)
    logger.info("Muon split: %d tensors to Muon, %d to AdamW", n_muon, n_all - n_muon)
    return out


def _decide_unknown(
    model: nn.Module, name: str, param: torch.Tensor, head_names: Iterable[str]
) -> MuonDecision:
    # A name the model's trainable parameters do not list (a frozen tensor someone grouped anyway,
    # or a non-first alias of a tied weight): classify it on its own rather than guess.
    modules = dict(model.named_modules(remove_duplicate=False))
    owner_name = name.rsplit(".", 1)[0] if "." in name else ""
    if owner_name not in modules:
        raise ValueError(
            f"parameter name {name!r} is not in the model; accepted: names from model.named_parameters()."
        )
    embedding_ids = frozenset(
        id(m.weight) for m in modules.values() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))
    )
    heads = _check_head_names(head_names)
    ctx = _ParamContext(name, param, modules[owner_name], owner_name, embedding_ids, heads)
    return _decide(ctx)


def _check_all_2d(params: Sequence[torch.Tensor], names: Sequence[str] | None, where: str) -> None:
    for i, param in enumerate(params):
        if param.ndim != 2:
            label = repr(names[i]) if names is not None else f"#{i}"
            raise ValueError(
                f"{where} has use_muon=True but parameter {label} has shape {tuple(param.shape)} "
                f"({param.ndim}-D); Muon accepts only 2-D matrices. Set use_muon=False for it "
                "(AdamW) or leave use_muon unset to let the split rules decide."
            )


# --------------------------------------------------------------------------------------------------
# The optimizer
# --------------------------------------------------------------------------------------------------


def _torch_muon_update() -> Callable[..., None]:
    """torch's functional Muon update (torch >= 2.9), else :func:`_muon_update` (the same algorithm)."""
    try:
        from torch.optim._muon import muon
    except ImportError:  # torch 2.4-2.8: no torch.optim.Muon
        return _muon_update
    return muon


def _newton_schulz(
    grad: torch.Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int, eps: float
) -> torch.Tensor:
    """torch.optim's ``_zeropower_via_newtonschulz`` (torch 2.9), for a torch without it.

    ``X = G / max(||G||_F, eps)`` in bfloat16 (transposed when ``G`` has more rows than columns), then
    ``ns_steps`` times ``A = X X^T; B = b A + c A A; X = a X + B X``: an approximate orthogonalisation
    of ``G`` (singular values pushed towards ~0.7-1.2). Every operation and its order are torch's, so
    the result is the same bit for bit (``tests/optim/test_muon.py``).
    """
    a, b, c = ns_coefficients
    ortho = grad.bfloat16()
    if grad.size(0) > grad.size(1):
        ortho = ortho.T
    ortho.div_(ortho.norm().clamp(min=eps))
    for _ in range(ns_steps):
        gram = ortho @ ortho.T
        gram_update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        ortho = torch.addmm(ortho, gram_update, ortho, beta=a)
    if grad.size(0) > grad.size(1):
        ortho = ortho.T
    return ortho


def _muon_update(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_bufs: list[torch.Tensor],
    *,
    lr: float | torch.Tensor,
    weight_decay: float,
    momentum: float,
    nesterov: bool,
    ns_coefficients: tuple[float, float, float],
    ns_steps: int,
    eps: float,
    adjust_lr_fn: str | None,
    has_complex: bool,
) -> None:
    """torch.optim's functional Muon update (torch 2.9's ``_single_tensor_muon``), for a torch without it.

    Per matrix: ``B = lerp(B, g, 1 - momentum)``; the update ``U = NS(lerp(g, B, momentum))`` with
    Nesterov, else ``NS(B)``; ``p *= 1 - lr * weight_decay``; ``p -= lr' * U`` with ``lr'`` =
    ``lr * sqrt(max(1, rows / cols))`` (``adjust_lr_fn`` None or ``"original"``) or
    ``lr * 0.2 * sqrt(max(rows, cols))`` (``"match_rms_adamw"``).
    """
    if has_complex:
        raise ValueError("Complex parameters are not supported")
    lr = lr.item() if isinstance(lr, torch.Tensor) else lr
    for param, grad, buf in zip(params, grads, momentum_bufs):
        if grad.ndim != 2:
            raise ValueError("Param gradient must be a 2D matrix")
        buf.lerp_(grad, 1 - momentum)
        update = _newton_schulz(grad.lerp(buf, momentum) if nesterov else buf, ns_coefficients, ns_steps, eps)
        rows, cols = param.shape[:2]
        ratio = 0.2 * math.sqrt(max(rows, cols)) if adjust_lr_fn == "match_rms_adamw" else math.sqrt(max(1, rows / cols))
        param.mul_(1 - lr * weight_decay)
        param.add_(update, alpha=-lr * ratio)


def _scalar_dtype() -> torch.dtype:
    # Same choice as torch.optim's step counters: float64 only when that is the default dtype.
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon on the ``use_muon=True`` groups, AdamW on the others, with one ``param_groups`` list.

    Every group must say ``use_muon`` (use :func:`split_muon_groups` or :func:`build_muon` to get
    such groups from a model); see the module docstring for the update formulas and group keys.

    Args:
        params: param groups, each with ``use_muon``; a plain list of tensors is refused because
            the split needs names and modules.
        lr: default lr of groups that carry none (Muon groups; AdamW groups too unless ``adamw_lr``).
        weight_decay: default decoupled weight decay of both parts (torch.optim.Muon's 0.1).
        momentum, nesterov, ns_coefficients, ns_steps, adjust_lr_fn: Muon defaults (torch's).
        muon_eps: the Newton-Schulz norm floor of Muon groups (torch's ``eps``, 1e-7).
        adamw_lr: default lr of AdamW groups that carry none; ``None`` means ``lr``.
        betas, eps, amsgrad, foreach: AdamW defaults (torch's).

    Raises:
        ValueError: a group without ``use_muon``, a non-2-D tensor in a Muon group (named), a key of
            the other algorithm in a group, or a hyper-parameter out of range.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        *,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = _NS_COEFFICIENTS,
        ns_steps: int = 5,
        muon_eps: float = 1e-7,
        adjust_lr_fn: str | None = None,
        adamw_lr: float | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        amsgrad: bool = False,
        foreach: bool | None = None,
    ) -> None:
        self._algo_defaults = {
            True: {
                "momentum": momentum,
                "nesterov": nesterov,
                "ns_coefficients": tuple(ns_coefficients),
                "ns_steps": ns_steps,
                "eps": muon_eps,
                "adjust_lr_fn": adjust_lr_fn,
            },
            False: {
                "lr": lr if adamw_lr is None else adamw_lr,
                "betas": tuple(betas),
                "eps": eps,
                "amsgrad": amsgrad,
                "foreach": foreach,
            },
        }
        defaults = {"lr": lr, "weight_decay": weight_decay}
        _check_hyper(defaults | self._algo_defaults[True], True, "MuonWithAdamW")
        _check_hyper(defaults | self._algo_defaults[False], False, "MuonWithAdamW")
        super().__init__(params, defaults)

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim.Optimizer pickles only defaults/state/param_groups; keep the per-algorithm
        # defaults too so that an unpickled optimizer can still add_param_group.
        return {**super().__getstate__(), "_algo_defaults": self._algo_defaults}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group: fill the defaults of its algorithm, then check it (see the class docstring)."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}.")
        index = len(self.param_groups)
        where = f"param_groups[{index}] ({param_group.get('name', 'unnamed')!r})"
        if "use_muon" not in param_group:
            raise ValueError(
                f"{where} has no 'use_muon' key; MuonWithAdamW needs every group to say whether it "
                "runs Muon (True) or AdamW (False). Build the groups with "
                "optsched.optim.muon.split_muon_groups(model, groups) or use build_muon(model, ...)."
            )
        use_muon = check_bool(f"{where}['use_muon']", param_group["use_muon"])
        foreign = sorted(set(param_group) & (_ADAMW_ONLY_KEYS if use_muon else _MUON_ONLY_KEYS))
        if foreign:
            raise ValueError(
                f"{where} runs {'Muon' if use_muon else 'AdamW'} but sets {foreign}, which only "
                f"{'AdamW' if use_muon else 'Muon'} uses; remove them or move the parameters to a "
                f"use_muon={not use_muon} group."
            )
        for key, value in self._algo_defaults[use_muon].items():
            param_group.setdefault(key, value)
        if "betas" in param_group:
            param_group["betas"] = tuple(param_group["betas"])
        if "ns_coefficients" in param_group:
            param_group["ns_coefficients"] = tuple(param_group["ns_coefficients"])
        super().add_param_group(param_group)  # fills lr / weight_decay, checks leaves and overlaps
        try:
            _check_hyper(param_group, use_muon, where)
            if use_muon:
                _check_all_2d(param_group["params"], param_group.get("param_names"), where)
        except (TypeError, ValueError):
            self.param_groups.pop()  # a refused group must not stay half-added
            raise

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state; refuses one whose groups' ``use_muon`` flags differ from this optimizer's."""
        saved = state_dict.get("param_groups", [])
        if len(saved) == len(self.param_groups):
            for i, (now, then) in enumerate(zip(self.param_groups, saved)):
                if then.get("use_muon") != now["use_muon"]:
                    raise ValueError(
                        f"param_groups[{i}] ({now.get('name', 'unnamed')!r}) has use_muon={now['use_muon']} "
                        f"but the checkpoint has use_muon={then.get('use_muon')!r}; the saved state does "
                        "not fit the algorithm. Rebuild the optimizer with the checkpoint's split."
                    )
        super().load_state_dict(state_dict)  # counts of groups and params are checked there

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every group: Muon for ``use_muon`` groups, AdamW for the others.

        Args:
            closure: re-evaluates the model and returns the loss (optional).

        Returns:
            The closure's loss, or ``None``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _muon_step(self, group: dict[str, Any]) -> None:
        params, grads, bufs = [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse or torch.is_complex(p):
                raise RuntimeError("Muon does not support sparse gradients or complex parameters.")
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            bufs.append(state["momentum_buffer"])
        if not params:
            return
        _torch_muon_update()(
            params,
            grads,
            bufs,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            nesterov=group["nesterov"],
            ns_coefficients=group["ns_coefficients"],
            ns_steps=group["ns_steps"],
            eps=group["eps"],
            adjust_lr_fn=group["adjust_lr_fn"],
            has_complex=False,
        )

    def _adamw_step(self, group: dict[str, Any]) -> None:
        from torch.optim.adamw import adamw  # torch's functional AdamW (every torch >= 2.4)

        params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps = [], [], [], [], [], []
        has_complex = False
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("AdamW does not support sparse gradients.")
            has_complex |= torch.is_complex(p)
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            if group["amsgrad"]:
                max_sqs.append(state["max_exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        adamw(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            max_sqs,
            steps,
            foreach=group["foreach"],
            has_complex=has_complex,
            amsgrad=group["amsgrad"],
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )


def _check_hyper(group: Mapping[str, Any], use_muon: bool, where: str) -> None:
    """Validate the hyper-parameters one group of the given algorithm uses."""
    check_number(f"{where} lr", group["lr"], low=0.0)
    check_number(f"{where} weight_decay", group["weight_decay"], low=0.0)
    if use_muon:
        check_number(f"{where} momentum", group["momentum"], low=0.0, high=1.0, high_open=True)
        check_bool(f"{where} nesterov", group["nesterov"])
        check_int(f"{where} ns_steps", group["ns_steps"], low=1, high=99)  # torch refuses >= 100
        check_number(f"{where} eps", group["eps"], low=0.0, low_open=True)
        if group["adjust_lr_fn"] is not None:
            check_choice(f"{where} adjust_lr_fn", group["adjust_lr_fn"], _ADJUST_LR_FNS, what="lr adjustment")
        coefficients = group["ns_coefficients"]
        if len(coefficients) != 3:
            raise ValueError(
                f"{where} ns_coefficients={coefficients!r} has {len(coefficients)} values; "
                "accepted: (a, b, c)."
            )
        for i, c in enumerate(coefficients):
            check_number(f"{where} ns_coefficients[{i}]", c)
    else:
        betas = group["betas"]
        if len(betas) != 2:
            raise ValueError(f"{where} betas={betas!r} has {len(betas)} values; accepted: (beta1, beta2).")
        for i, beta in enumerate(betas):
            check_number(f"{where} betas[{i}]", beta, low=0.0, high=1.0, high_open=True)
        check_number(f"{where} eps", group["eps"], low=0.0)
        check_bool(f"{where} amsgrad", group["amsgrad"])
        check_bool(f"{where} foreach", group["foreach"], allow_none=True)


def muon_state_bytes(param_groups: Iterable[Mapping[str, Any]]) -> int:
    """Bytes of optimizer state :class:`MuonWithAdamW` will hold for these groups after one step.

    Formula: Muon tensor ``n * s`` (one momentum buffer, ``s`` = bytes per element of the tensor);
    AdamW tensor ``2 * n * s`` (+ ``n * s`` with ``amsgrad``) + the 4-byte ``step`` counter
    (8 bytes when the default dtype is float64). Every group needs ``use_muon``.
    """
    step_bytes = torch.tensor(0.0, dtype=_scalar_dtype()).element_size()
    total = 0
    for index, group in enumerate(param_groups):
        if "use_muon" not in group:
            raise ValueError(f"param_groups[{index}] has no 'use_muon' key; run split_muon_groups first.")
        for p in group["params"]:
            size = p.numel() * p.element_size()
            if group["use_muon"]:
                total += size
            else:
                total += (3 if group.get("amsgrad", False) else 2) * size + step_bytes
    return total


# --------------------------------------------------------------------------------------------------
# Construction from TrainingArguments
# --------------------------------------------------------------------------------------------------


def prepare_muon(
    model: nn.Module,
    param_groups: Sequence[Mapping[str, Any]] | None = None,
    *,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    adjust_lr_fn: str | None = "match_rms_adamw",
    muon_eps: float = 1e-7,
    adamw_lr: float | None = None,
    adamw_lr_ratio: float | None = None,
    head_names: Iterable[str] = DEFAULT_HEAD_NAMES,
) -> dict[str, Any]:
    """The keyword arguments of :class:`MuonWithAdamW`, ``params`` (the split groups) included.

    ``MuonWithAdamW(**prepare_muon(model, groups, ...))`` is :func:`build_muon`; the registry's
    builder hook (:func:`muon_builder`) returns this dict so that the factory's usual
    ``cls(kwargs.pop("params"), **kwargs)`` builds the optimizer. See :func:`build_muon` for the args.

    Raises:
        ValueError: both ``adamw_lr`` and ``adamw_lr_ratio``, or any bad value (named).
    """
    check_number("lr", lr, low=0.0)
    check_number("adamw_lr", adamw_lr, low=0.0, allow_none=True)
    check_number("adamw_lr_ratio", adamw_lr_ratio, low=0.0, allow_none=True)
    if adamw_lr is not None and adamw_lr_ratio is not None:
        raise ValueError(
            f"adamw_lr={adamw_lr!r} and adamw_lr_ratio={adamw_lr_ratio!r} are both set; "
            "accepted: one of them "
            "(adamw_lr sets the AdamW lr, adamw_lr_ratio scales it relative to lr)."
        )
    groups = split_muon_groups(model, param_groups, head_names=head_names)
    if adamw_lr_ratio is not None:
        for group in groups:
            if not group["use_muon"] and "lr" in group:
                group["lr"] = group["lr"] * adamw_lr_ratio
        adamw_lr = lr * adamw_lr_ratio
    return {
        "params": groups,
        "lr": lr,
        "weight_decay": weight_decay,
        "momentum": momentum,
        "nesterov": nesterov,
        "ns_steps": ns_steps,
        "muon_eps": muon_eps,
        "adjust_lr_fn": adjust_lr_fn,
        "adamw_lr": adamw_lr,
        "betas": betas,
        "eps": eps,
    }


def build_muon(
    model: nn.Module, param_groups: Sequence[Mapping[str, Any]] | None = None, **kwargs: Any
) -> MuonWithAdamW:
    """Split ``param_groups`` (or all of ``model``) and build one :class:`MuonWithAdamW`.

    ``adjust_lr_fn`` defaults to ``"match_rms_adamw"`` so that one ``lr`` suits both parts (see the
    module docstring).

    Args:
        model: the model the groups come from.
        param_groups: groups following the param-group contract; ``None`` = one group of all
            trainable parameters with ``weight_decay`` applied to all.
        **kwargs: keyword-only, as :func:`prepare_muon`:
            ``lr`` (both parts; groups with their own ``lr`` keep it), ``weight_decay`` (default of
            groups that carry none), ``betas``, ``eps`` (AdamW part), ``momentum``, ``nesterov``,
            ``ns_steps``, ``adjust_lr_fn``, ``muon_eps`` (Muon part), ``adamw_lr`` (absolute lr of
            AdamW groups without their own ``lr``), ``adamw_lr_ratio`` (multiplies the lr of every
            AdamW group, own or default, which keeps layer-decay and rule multipliers),
            ``head_names`` (module names treated as output heads).

    Raises:
        ValueError: both ``adamw_lr`` and ``adamw_lr_ratio``, or any bad value (named).
        TypeError: an unknown keyword.
    """
    return MuonWithAdamW(**prepare_muon(model, param_groups, **kwargs))


def muon_builder(ctx: Any) -> tuple[type[MuonWithAdamW], dict[str, Any]]:
    """The registry's builder hook for ``optim="muon"``: ``(MuonWithAdamW, kwargs with params)``.

    ``ctx`` is an ``optsched.optim.factory.BuildContext``: ``ctx.model``, ``ctx.args`` and
    ``ctx.kwargs`` (lr/betas/eps/weight_decay from TrainingArguments plus the parsed ``optim_args``)
    are read. The groups come from ``optsched.params.build_param_groups(model, args)`` and are split
    here, so ``create_optimizer`` pops ``kwargs["params"]`` in place of its own groups.

    Raises:
        ValueError: no model (the split needs module types and names).
    """
    if ctx.model is None:
        raise ValueError("optim='muon' needs the model (to split Muon and AdamW parameters); pass model=.")
    from optsched.params import build_param_groups  # the params package, per the flow's one direction

    groups = build_param_groups(ctx.model, ctx.args)
    return MuonWithAdamW, prepare_muon(ctx.model, groups, **ctx.kwargs)


def muon_spec() -> Any:
    """The ``OptimizerSpec`` that registers ``optim="muon"`` (``register_optimizer(muon_spec())``)."""
    from optsched.optim.spec import OptimArg, OptimizerSpec

    return OptimizerSpec(
        name="muon",
        cls="optsched.optim.muon.MuonWithAdamW",
        common=("lr", "betas", "eps", "weight_decay"),
        optim_args=tuple(
            OptimArg(key, kind.__name__, help=_OPTIM_ARGS_HELP[key]) for key, kind in MUON_OPTIM_ARGS.items()
        ),
        needs_model=True,
        builder=muon_builder,
        description="torch.optim.Muon on hidden 2-D matrices, AdamW on the rest, in one optimizer",
    )


_OPTIM_ARGS_HELP = {
    "momentum": "Muon momentum (0.95)",
    "nesterov": "Muon Nesterov momentum (true)",
    "ns_steps": "Newton-Schulz iterations (5)",
    "adjust_lr_fn": "Muon lr scaling: match_rms_adamw (default here) or original",
    "muon_eps": "Newton-Schulz norm floor (1e-7)",
    "adamw_lr": "absolute lr of the AdamW part (groups without their own lr)",
    "adamw_lr_ratio": "AdamW lr = ratio x lr, for every AdamW group",
}


def muon_kwargs_from_args(args: Any, optim_args: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The kwargs of :func:`build_muon` from a TrainingArguments-like object and parsed ``optim_args``.

    Reads ``learning_rate``, ``weight_decay``, ``adam_beta1``, ``adam_beta2``, ``adam_epsilon`` by
    attribute (optsched's or transformers' TrainingArguments). ``optim_args`` is a mapping of typed
    values (what ``parse_optim_args("muon", ...)`` returns); keys: :data:`MUON_OPTIM_ARGS`.

    Raises:
        ValueError: an unknown ``optim_args`` key (with "did you mean").
    """
    optim_args = dict(optim_args or {})
    for key in optim_args:
        check_choice("optim_args key", key, MUON_OPTIM_ARGS, what="optim_args key for optim='muon'")
    kwargs: dict[str, Any] = {
        "lr": args.learning_rate,
        "weight_decay": args.weight_decay,
        "betas": (args.adam_beta1, args.adam_beta2),
        "eps": args.adam_epsilon,
    }
    kwargs.update(optim_args)
    if "ns_steps" in kwargs:
        check_int("optim_args ns_steps", kwargs["ns_steps"], low=1, high=99)
    if "nesterov" in kwargs:
        check_bool("optim_args nesterov", kwargs["nesterov"])
    return kwargs
