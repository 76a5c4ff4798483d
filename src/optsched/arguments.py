"""``TrainingArguments``: transformers' training fields and defaults, validated, plus warmup arithmetic.

The dataclass mirrors the fields of ``transformers.TrainingArguments`` (5.23) that concern training:
the same names, the same defaults, the same normalisations in ``__post_init__`` (``output_dir=None``
becomes ``"trainer_output"``, ``report_to="none"`` becomes ``[]``, ``eval_steps`` falls back to
``logging_steps``, ...). It differs on purpose in three ways:

* every field is validated, and a bad value raises ``ValueError`` / ``TypeError`` naming the field,
  the value and what is accepted (transformers accepts ``learning_rate=-1`` or ``adam_beta1=1.5``);
* an unknown keyword raises ``TypeError`` with a "did you mean" (``learning_rat=...``);
* it remembers which fields the caller passed explicitly (:attr:`TrainingArguments.explicit_fields`),
  because an explicit ``adam_beta1=0.9`` (SGD momentum in the seed's example) means something
  different from the default ``0.9``, and ``optim`` left at its default may fall back from the fused
  AdamW where a fused kernel is unavailable.

Adding a field is one declaration: ``name: type = _field(default, "help", check)``; ``check`` is a pure
``(field_name, value) -> normalised value`` function (see ``_CHECKS`` below), and the CLI builds its
flags from the fields and their ``help`` metadata.

Example:
    >>> args = TrainingArguments(learning_rate=1e-3, warmup_ratio=0.1)
    >>> args.get_warmup_steps(100)
    10
    >>> sorted(args.explicit_fields)
    ['learning_rate', 'warmup_ratio']
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import functools
import json
import logging
import math
import multiprocessing
import numbers
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from optsched._validation import (
    check_bool,
    check_choice,
    check_int,
    check_number,
    did_you_mean,
    integral_to_int,
    parse_json_mapping,
)

__all__ = ["TrainingArguments", "as_training_arguments"]

logger = logging.getLogger(__name__)

#: ``transformers.IntervalStrategy`` values (logging and evaluation).
INTERVAL_STRATEGIES = ("no", "steps", "epoch")
#: ``transformers.SaveStrategy`` values.
SAVE_STRATEGIES = ("no", "steps", "epoch", "best")
#: ``include_num_input_tokens_seen`` values (transformers' names; True / False mean "all" / "no").
TOKENS_SEEN_MODES = ("all", "non_padding", "no")
#: What a resume does when the arguments describe another plan than the checkpoint's
#: (``optsched.trainer.resume``): follow the new plan, keep the lr continuous, or refuse.
LR_RESUME_POLICIES = ("replan", "continue", "strict")
#: How a resume checks checkpoint files against their checksums.json (optsched.trainer.checkpoint).
CHECKPOINT_VERIFICATION = ("full", "size")


def _default_optim() -> str:
    """transformers' default ``optim``: torch's fused AdamW from torch 2.8 on, its plain AdamW before
    (transformers turns the fused kernel on by default only from 2.8)."""
    import torch

    major, minor = (int(part) for part in torch.__version__.split(".")[:2])  # "2.8.0a0+git..." counts as 2.8
    return "adamw_torch_fused" if (major, minor) >= (2, 8) else "adamw_torch"


#: transformers' default ``optim`` for the installed torch (``adamw_torch_fused`` from torch 2.8 on).
DEFAULT_OPTIM = _default_optim()
#: transformers 5 replaces ``output_dir=None`` by this directory.
DEFAULT_OUTPUT_DIR = "trainer_output"
#: Schedules that step on a metric; transformers then defaults ``metric_for_best_model`` to "loss".
METRIC_SCHEDULES = frozenset({"reduce_lr_on_plateau", "greedy"})
#: ``log_level`` / ``log_level_replica`` values: transformers' names ("detail" is "debug") and "passive",
#: which leaves the ``optsched`` logger's level as the application set it (optsched.trainer.log_levels).
LOG_LEVELS = ("detail", "debug", "info", "warning", "error", "critical", "passive")
#: ``train_sampling_strategy`` values optsched's Trainer implements (transformers 5.23 also has
#: "sequential" and "batch_rebalance", refused with a clear error rather than ignored).
TRAIN_SAMPLING_STRATEGIES = ("random", "group_by_length")
#: optsched's own fields, which ``transformers.TrainingArguments`` does not have (reliability, issue 7;
#: ``lr_resume_policy``, issue 5; ``model_input_name``, which transformers takes from its processing_class).
OPTSCHED_ONLY_FIELDS = frozenset({"save_on_signal", "save_signals", "max_consecutive_nonfinite",
                                  "lr_resume_policy", "decay_policy", "param_rules",
                                  "layerwise_lr_decay", "layer_id_fn", "checkpoint_verification",
                                  "model_input_name"})
#: transformers' ``torch_compile_backend`` for ``torch_compile=True`` without one (on CPU and CUDA; it
#: picks Gaudi's or Neuron's backend on those devices, which optsched does not run on).
DEFAULT_COMPILE_BACKEND = "inductor"
#: Largest seed numpy accepts (``np.random.seed`` takes ``[0, 2**32 - 1]``).
MAX_SEED = 2**32 - 1

Check = Callable[[str, Any], Any]


# --------------------------------------------------------------------------------------------------
# Per-field checks: pure functions ``(field, value) -> normalised value``.
# --------------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A ``str``-valued enum (transformers' ``OptimizerNames``, ``SchedulerType``, ...) -> its value."""
    return value.value if isinstance(value, enum.Enum) else value


def _float(low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False) -> Check:
    def check(name: str, value: Any) -> float:
        return float(check_number(name, value, low=low, high=high, low_open=low_open, high_open=high_open))

    return check


def _int(low: int | None = None, high: int | None = None, *, allow_none: bool = False) -> Check:
    def check(name: str, value: Any) -> int | None:
        return check_int(name, value, low=low, high=high, allow_none=allow_none)

    return check


def _bool(allow_none: bool = False) -> Check:
    def check(name: str, value: Any) -> bool | None:
        return check_bool(name, value, allow_none=allow_none)

    return check


def _choice(choices: tuple[str, ...], what: str) -> Check:
    def check(name: str, value: Any) -> str:
        return check_choice(name, value, choices, what=what)

    return check


def _str(allow_none: bool = False) -> Check:
    """A non-empty string (a name, a column, a key), or None with ``allow_none``."""
    accepted = "a non-empty string or None" if allow_none else "a non-empty string"

    def check(name: str, value: Any) -> str | None:
        if value is None and allow_none:
            return None
        if not isinstance(value, str):
            raise TypeError(f"{name} must be {accepted}, got {type(value).__name__} {value!r}.")
        if not value.strip():
            raise ValueError(f"{name}={value!r} is empty; accepted: {accepted}.")
        return value

    return check


def _train_sampling_strategy(name: str, value: Any) -> str:
    value = _plain(value)
    if value in ("sequential", "batch_rebalance"):
        raise ValueError(
            f"{name}={value!r} is one of transformers' samplers that optsched's Trainer does not implement; "
            f"accepted: {', '.join(map(repr, TRAIN_SAMPLING_STRATEGIES))}."
        )
    return check_choice(name, value, TRAIN_SAMPLING_STRATEGIES, what="training sampler")


def _optional_names(name: str, value: Any) -> list[str] | None:
    """``None``, or a list of non-empty strings (a single string is a list of one)."""
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(item, str) and item for item in items):
        raise TypeError(f"{name} must be a list of non-empty strings or None, got {type(value).__name__} {value!r}.")
    return list(items)


def _tokens_seen(name: str, value: Any) -> str:
    # transformers' rule: a bool maps to "all" / "no"
    if isinstance(value, bool):
        return "all" if value else "no"
    return check_choice(name, value, TOKENS_SEEN_MODES, what="token count")


def _name_list(name: str, value: Any, choices: tuple[str, ...], what: str, *, spaced: bool) -> list[str]:
    """A list field of names among ``choices``: ``None`` -> ``[]``; a string is one name, or with ``spaced``
    several separated by spaces (transformers' ``debug``); enum members give their values; repeats dropped;
    an unknown name refused with a "did you mean"."""
    if value is None:
        return []
    items = (value.split() if spaced else [value]) if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        form = "a space-separated string or a list" if spaced else "a list"
        raise TypeError(
            f"{name} must be {form} of names among {', '.join(choices)}, got {type(value).__name__} {value!r}."
        )
    return list(dict.fromkeys(check_choice(name, _plain(item), choices, what=what) for item in items))


#: What ``include_for_metrics`` may add to ``EvalPrediction`` (transformers 5's options).
METRIC_INCLUSIONS = ("inputs", "loss")


def _metric_inclusions(name: str, value: Any) -> list[str]:
    """``include_for_metrics``: ``None`` -> ``[]`` (transformers' default); a name or a list of names among
    :data:`METRIC_INCLUSIONS`, repeats dropped. transformers checks nothing (a typo such as ``"losses"``
    silently adds nothing); here it is refused with a "did you mean"."""
    return _name_list(name, value, METRIC_INCLUSIONS, "option", spaced=False)


#: ``debug`` options optsched implements (transformers' "tpu_metrics_debug" is refused: no TPU here).
DEBUG_OPTIONS = ("underflow_overflow",)


def _debug_options(name: str, value: Any) -> list[str]:
    """``debug``: transformers' space-separated string (``""`` -> ``[]``), or a list of names or
    ``DebugOption`` members; repeats dropped."""
    items = value.split() if isinstance(value, str) else value
    if isinstance(items, (list, tuple)) and "tpu_metrics_debug" in map(_plain, items):
        raise ValueError(f"{name}={value!r}: 'tpu_metrics_debug' prints TPU metrics (torch_xla), and optsched "
                         f"does not run on TPUs; accepted: {', '.join(DEBUG_OPTIONS)}, or ''.")
    return _name_list(name, value, DEBUG_OPTIONS, "debug option", spaced=True)


def _start_method(name: str, value: Any) -> str | None:
    return None if value is None else check_choice(
        name, value, tuple(multiprocessing.get_all_start_methods()), what="start method")


#: ``ddp_backend`` values (transformers' choices).
DDP_BACKENDS = ("nccl", "gloo", "mpi", "xccl", "hccl", "cncl", "mccl")


def _ddp_backend(name: str, value: Any) -> str | None:
    return None if value is None else check_choice(name, value, DDP_BACKENDS, what="torch.distributed backend")


def _output_dir(name: str, value: Any) -> str:
    """``None`` -> ``"trainer_output"`` (transformers 5); paths -> ``str`` with ``~`` expanded."""
    if value is None:
        return DEFAULT_OUTPUT_DIR
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(
            f"{name} must be a path (str or os.PathLike) or None, "
            f"got {type(value).__name__} {value!r}."
        )
    path = os.fspath(value)
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"{name}={value!r} is not a usable directory; accepted: a non-empty path or None.")
    return os.path.expanduser(path)


def _max_steps(name: str, value: Any) -> int:
    """transformers trains for ``num_train_epochs`` unless ``max_steps > 0``; 0 and < -1 are typos."""
    steps = check_int(name, value)
    if steps != -1 and steps < 1:
        raise ValueError(
            f"{name}={value!r} is out of range; accepted: -1 (train for num_train_epochs) or an integer >= 1."
        )
    return steps


def _count_or_ratio(name: str, value: Any, counts: str) -> int | float:
    """A step count (``counts`` says which integers) or a float in (0, 1), a fraction of the total.

    A float with an integral value is the count (``10.0`` -> 10: transformers' parser makes floats);
    unlike transformers, a float > 1 with a fractional part (``2.5``) is refused instead of truncated.
    """
    check_number(name, value, low=0)
    value = integral_to_int(value)
    if isinstance(value, float) and value > 1:
        raise ValueError(
            f"{name}={value!r} is neither a step count nor a ratio; accepted: {counts} "
            "or a float in (0, 1) (a fraction of the training steps)."
        )
    return value


def _warmup_steps(name: str, value: Any) -> int | float:
    """An int >= 0 (steps) or a float in (0, 1) (a fraction of the total steps, transformers 5)."""
    return _count_or_ratio(name, value, "an integer >= 0 (steps)")


def _steps_or_ratio(allow_none: bool) -> Check:
    """``logging_steps`` / ``eval_steps`` / ``save_steps``: an int >= 0 or a ratio in (0, 1).

    Zero is accepted here (transformers accepts it when the matching strategy is not "steps"); the
    strategy-dependent rule is checked across fields in ``_check_step_intervals``.
    """

    def check(name: str, value: Any) -> int | float | None:
        if value is None and allow_none:
            return None
        return _count_or_ratio(name, value, "an integer >= 1")

    return check


def _naming(field: str, value: Any, exc: Exception) -> Exception:
    """``exc`` itself when its message names ``field``, else a copy that does (other modules' errors)."""
    message = str(exc)
    if field in message:
        return exc
    return type(exc)(f"{field}={value!r}: {message}")


def _optim(name: str, value: Any) -> str:
    from optsched.optim import list_optimizers  # lazy: optsched.optim imports this module's users

    return check_choice(name, value, list_optimizers(), what="optimizer name")


def _optim_args(name: str, value: Any) -> str | dict[str, Any] | None:
    """Kept as given (a ``"k=v,k=v"`` / JSON string or a dict) for serialisation and HF parity."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(
        f"{name} must be a dict, a JSON object string or a 'key=value,key=value' string, "
        f"got {type(value).__name__} {value!r}."
    )


def _optim_target_modules(name: str, value: Any) -> str | list[str] | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        for item in value:
            if not isinstance(item, str):
                raise TypeError(
                    f"{name} must be a string or a list of strings, "
                    f"got an item {type(item).__name__} {item!r}."
                )
        return list(value)
    raise TypeError(
        f"{name} must be a string, "
        f"a list of strings or None, got {type(value).__name__} {value!r}."
    )


def _lr_scheduler_type(name: str, value: Any) -> str:
    from optsched.schedules import resolve_schedule_name

    value = _plain(value)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {type(value).__name__} {value!r}.")
    try:
        return resolve_schedule_name(value)
    except (TypeError, ValueError) as exc:
        raise _naming(name, value, exc) from None


def _lr_scheduler_kwargs(name: str, value: Any) -> dict[str, Any]:
    kwargs = parse_json_mapping(name, value)
    for key in kwargs:
        if not isinstance(key, str):
            raise TypeError(f"{name} keys must be strings, got {type(key).__name__} {key!r}.")
    return kwargs


def _optional_kwargs(name: str, value: Any) -> dict[str, Any] | None:
    """``None`` stays ``None`` (transformers' default); else :func:`_lr_scheduler_kwargs`' rules."""
    return None if value is None else _lr_scheduler_kwargs(name, value)


def _compile_backend(name: str, value: Any) -> str | None:
    from optsched.trainer.compile import check_backend  # lazy: torch._dynamo is imported to list them

    return check_backend(name, value)


def _compile_mode(name: str, value: Any) -> str | None:
    from optsched.trainer.compile import check_mode

    return check_mode(name, value)


def _optional_positive(name: str, value: Any) -> float | None:
    """``None``, or a finite number > 0 (as a ``float``)."""
    return None if value is None else float(check_number(name, value, low=0, low_open=True))


def _report_to(name: str, value: Any) -> list[str]:
    """``"none"`` / ``None`` -> ``[]``; a string -> a one-item list; ``"all"`` is kept for the Trainer."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(item, str) for item in items):
        raise TypeError(
            f"{name} must be a string or a list of strings, "
            f"got {type(value).__name__} {value!r}."
        )
    items = [item for item in items if item != "none"]
    return list(dict.fromkeys(items))  # drop repeats, keep order


def _signal_names(name: str, value: Any) -> str:
    """Signal names, as a comma-separated string or a list -> canonical ``"SIGTERM,SIGINT"``.

    Names are case-insensitive and the ``SIG`` prefix is optional (``"term"`` -> ``"SIGTERM"``); only
    signals this platform knows and that a handler may catch are accepted (not SIGKILL / SIGSTOP).
    """
    import signal

    if isinstance(value, str):
        items = [item.strip() for item in value.split(",")]
    elif isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
        items = [item.strip() for item in value]
    else:
        raise TypeError(
            f"{name} must be a comma-separated string or a list of signal names, "
            f"got {type(value).__name__} {value!r}."
        )
    catchable = sorted(
        s.name for s in signal.Signals if s.name.startswith("SIG") and not s.name.startswith("SIG_")
        and s not in (getattr(signal, "SIGKILL", None), getattr(signal, "SIGSTOP", None))
    )
    out: list[str] = []
    for item in filter(None, items):
        canon = item.upper() if item.upper().startswith("SIG") else "SIG" + item.upper()
        if canon not in catchable:
            raise ValueError(
                f"{name}={value!r}: {item!r} is not a signal a handler can catch.{did_you_mean(canon, catchable)} "
                f"Accepted: comma-separated names among {', '.join(catchable)}."
            )
        if canon not in out:
            out.append(canon)
    if not out:
        raise ValueError(f"{name}={value!r} names no signal; accepted: e.g. 'SIGTERM,SIGINT' "
                         "(set save_on_signal=False to catch none).")
    return ",".join(out)


def _decay_policy(name: str, value: Any) -> str | Callable[..., bool]:
    """A policy name (``"hf"``, ``"ndim"``, ``"hf+no_embeddings"``, ...) kept as given, or a callable."""
    from optsched.params.policies import resolve_decay_policy

    value = _plain(value)
    try:
        resolve_decay_policy(value)
    except (TypeError, ValueError) as exc:
        raise _naming(name, value, exc) from None
    return value


def _param_rules(name: str, value: Any) -> list[dict[str, Any]] | None:
    """Rules validated (optsched.params.rules) and kept as plain dicts; a JSON string is parsed."""
    from optsched.params.rules import normalize_param_rules

    return normalize_param_rules(value, name)


def _layerwise_lr_decay(name: str, value: Any) -> float | None:
    from optsched.params.layers import check_layerwise_lr_decay

    return check_layerwise_lr_decay(name, value)


def _layer_id_fn(name: str, value: Any) -> str | Callable[[str], int | None] | None:
    """An import path ``"module:function"`` (checked to import) or a callable, kept as given."""
    from optsched.params.layers import resolve_layer_id_fn

    resolve_layer_id_fn(value, name)
    return value


def _serialisable(value: Any) -> Any:
    """A callable field value as its import path ``"module:qualname"`` (JSON/YAML cannot hold functions).

    A callable that has no such path (a lambda, a local function) is written as ``"<repr>"`` with a
    warning: ``from_dict`` then refuses it, naming the field, rather than guessing a function.
    """
    if not callable(value):
        return copy.deepcopy(value)
    from optsched.params.layers import callable_path

    path = callable_path(value)
    if path is None:
        logger.warning("%r has no import path; it is written as its repr and cannot be read back. "
                       "Use a module-level function to serialise TrainingArguments exactly.", value)
        return f"<{getattr(value, '__qualname__', type(value).__name__)}>"
    return path


def _field(default: Any, help: str, check: Check) -> Any:
    """A dataclass field whose metadata carries its help text (for the CLI) and its check."""
    if isinstance(default, (dict, list)):
        raise TypeError("mutable defaults are not allowed; use None and normalise in the check.")
    return dataclasses.field(default=default, metadata={"help": help, "check": check})


# --------------------------------------------------------------------------------------------------
# The dataclass
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(repr=False)
class TrainingArguments:
    """transformers' training arguments (5.23 names and defaults), validated.

    Construct it like ``transformers.TrainingArguments``; every field is checked in ``__post_init__``
    (``ValueError`` for a bad value, ``TypeError`` for a wrong type, each naming the field, the value
    and what is accepted). Assigning a field later re-checks that field and marks it explicit; checks
    that span several fields run again with :func:`dataclasses.replace`.

    Normalisations (as transformers): enum values become plain strings; ``output_dir=None`` becomes
    ``"trainer_output"``; ``report_to`` becomes a list (``"none"`` -> ``[]``); ``lr_scheduler_kwargs``
    becomes a dict (JSON strings are parsed); ``eval_steps`` falls back to ``logging_steps`` when
    ``eval_strategy="steps"``; ``metric_for_best_model`` becomes ``"loss"`` with ``load_best_model_at_end``
    and for the metric-driven schedules; ``greater_is_better`` follows from the metric's name; ``disable_tqdm=None`` becomes
    ``False`` unless the ``optsched`` logger is quieter than WARNING. ``optim_args`` is kept as given and
    parsed by ``optsched.optim.parse_optim_args``.

    Warmup: ``warmup_steps`` is an int >= 0 or a float in (0, 1) meaning a fraction of the training
    steps (transformers 5); ``warmup_ratio`` is transformers 4's fraction in [0, 1). Give one; giving
    both with different meanings raises ``ValueError``. See :meth:`get_warmup_steps`.

    Differences from transformers, on purpose: ``fp16``/``bf16``/``tf32`` are not checked against the hardware
    (that is the Trainer's business: transformers refuses ``tf32=True`` without an Ampere GPU here, and sets
    TF32 here); a ``log_level`` outside transformers' names is refused here (transformers' Trainer fails
    with a ``KeyError``); the metric-driven schedules do not require an ``eval_strategy``
    (a plain loop steps them on its own metric; optsched's Trainer checks it when it trains).
    """

    output_dir: str | None = _field(
        None, "Where checkpoints and logs are written. None: 'trainer_output' (as transformers 5).",
        _output_dir)
    learning_rate: float = _field(5e-5, "The initial (peak) learning rate.", _float(low=0))
    weight_decay: float = _field(
        0.0, "Weight decay coefficient; biases and normalisation weights are excluded.", _float(low=0))
    adam_beta1: float = _field(
        0.9, "Adam's beta1, in [0, 1); SGD uses it as momentum when given explicitly.",
        _float(0, 1, high_open=True))
    adam_beta2: float = _field(0.999, "Adam's beta2, in [0, 1).", _float(0, 1, high_open=True))
    adam_epsilon: float = _field(1e-8, "Adam's epsilon, > 0.", _float(low=0, low_open=True))
    max_grad_norm: float = _field(1.0, "Gradient clipping norm; 0 disables clipping.", _float(low=0))
    num_train_epochs: float = _field(
        3.0, "Number of training epochs (may be fractional); ignored when max_steps > 0.",
        _float(low=0, low_open=True))
    max_steps: int = _field(
        -1, "Total optimizer steps; overrides num_train_epochs when > 0. -1: unset.", _max_steps)
    per_device_train_batch_size: int = _field(8, "Training batch size per device.", _int(low=1))
    per_device_eval_batch_size: int = _field(8, "Evaluation batch size per device.", _int(low=1))
    skip_memory_metrics: bool = _field(
        True, "Leave out the memory metrics (False: <stage>_mem_cpu_alloc_delta / _peaked_delta, and _gpu_ on an "
        "accelerator, for init, train, eval and test, in bytes, as transformers reports them).", _bool())
    auto_find_batch_size: bool = _field(
        False, "When training runs out of memory, train again from the start with a per-device batch 0.9x as "
        "large, until one fits (transformers' rule; one process only). The batch found is saved in "
        "trainer_state.json, and a resume starts from it.", _bool())
    gradient_accumulation_steps: int = _field(
        1, "Micro-batches accumulated before each optimizer step.", _int(low=1))
    optim: str = _field(DEFAULT_OPTIM, "Optimizer name (transformers' names and optsched's own).", _optim)
    optim_args: str | dict | None = _field(
        None, "Extra optimizer arguments: a dict, a JSON object, or 'key=value,key=value'.", _optim_args)
    optim_target_modules: str | list[str] | None = _field(
        None, "Modules targeted by GaLore / APOLLO (a name, a regex, or a list of names).",
        _optim_target_modules)
    lr_scheduler_type: str = _field(
        "linear", "Learning-rate schedule name (aliases accepted).", _lr_scheduler_type)
    lr_scheduler_kwargs: dict | str | None = _field(
        None, "Extra schedule arguments: a dict or a JSON object string.", _lr_scheduler_kwargs)
    warmup_steps: int | float = _field(
        0, "Warmup: an integer number of steps, or a float in (0, 1) as a fraction of the steps.",
        _warmup_steps)
    warmup_ratio: float = _field(
        0.0, "Warmup as a fraction of the steps in [0, 1] (transformers 4); use warmup_steps or this.",
        _float(0, 1))
    logging_steps: int | float = _field(
        500, "Log every N steps (an integer), or every fraction of the steps (a float in (0, 1)).",
        _steps_or_ratio(allow_none=False))
    logging_strategy: str = _field("steps", "When to log: 'no', 'steps' or 'epoch'.",
                                   _choice(INTERVAL_STRATEGIES, "logging strategy"))
    logging_first_step: bool = _field(
        False, "Also log after the first optimizer step (global_step 1), whatever logging_strategy says.",
        _bool())
    logging_nan_inf_filter: bool = _field(
        True, "Leave NaN / inf losses out of the logged losses: a skipped non-finite training step out of 'loss' "
        "and 'train_loss', and batches with a non-finite loss (e.g. all labels -100) out of an evaluation's "
        "loss, unless no batch has a finite one (as transformers). False: every loss counts, so a NaN shows.",
        _bool())
    log_level: str = _field(
        "passive", "The level of the optsched logger, during the Trainer's calls, in the process that logs (see "
        "log_on_each_node): 'debug' (or 'detail'), 'info', 'warning', 'error', 'critical', or 'passive' (leave "
        "it as the application set it). With no logging handler configured, the records go to stderr.",
        _choice(LOG_LEVELS, "log level"))
    log_level_replica: str = _field(
        "warning", "log_level for the other processes under DDP (same names).", _choice(LOG_LEVELS, "log level"))
    log_on_each_node: bool = _field(
        True, "Under DDP on several nodes, log at log_level from each node's first process (local rank 0); "
        "False: from the global rank 0 only. The other processes use log_level_replica.", _bool())
    include_num_input_tokens_seen: str | bool = _field(
        "no", "Count the input tokens trained on in state.num_input_tokens_seen (summed over processes) and log "
        "it with train_tokens_per_second: 'all' (every element of the model's main input), 'non_padding' "
        "(attention_mask's sum), 'no'; True / False mean 'all' / 'no'.", _tokens_seen)
    eval_strategy: str = _field("no", "When to evaluate: 'no', 'steps' or 'epoch'.",
                                _choice(INTERVAL_STRATEGIES, "evaluation strategy"))
    eval_steps: int | float | None = _field(
        None, "Evaluate every N steps (or a fraction in (0, 1)); None: logging_steps.",
        _steps_or_ratio(allow_none=True))
    eval_delay: float = _field(
        0, "No evaluation before this global step (eval_strategy='steps') or epoch (eval_strategy='epoch'); "
        "a number >= 0. 0: from the first due evaluation on.", _float(low=0))
    eval_on_start: bool = _field(
        False, "Evaluate once before the first training step (a sanity check of the evaluation; at the resumed "
        "step when resuming).", _bool())
    save_strategy: str = _field("steps", "When to save: 'no', 'steps', 'epoch' or 'best'.",
                                _choice(SAVE_STRATEGIES, "save strategy"))
    save_steps: int | float = _field(
        500, "Save every N steps (an integer), or every fraction of the steps (a float in (0, 1)).",
        _steps_or_ratio(allow_none=False))
    save_total_limit: int | None = _field(
        None, "Keep at most this many checkpoints (None: keep all). Older ones are deleted once the newest "
        "is flushed to disk (on a worker thread), so one more may exist meanwhile.", _int(low=1, allow_none=True))
    save_only_model: bool = _field(
        False, "Save only the model weights (no optimizer, scheduler or RNG state: no exact resume).",
        _bool())
    ignore_data_skip: bool = _field(
        False, "On a resume, start the resumed epoch from its first batch instead of skipping those already "
        "trained on (RNG states still restored): batches are seen again, unlike the uninterrupted run.", _bool())
    restore_callback_states_from_checkpoint: bool = _field(
        False, "On a resume, restore the stateful callbacks (transformers' ExportableState, e.g. "
        "EarlyStoppingCallback's patience counter) and the TrainerControl from the checkpoint's "
        "trainer_state.json: each callback of a saved class is rebuilt from its saved state.", _bool())
    seed: int = _field(42, "Random seed set at the start of training.", _int(0, MAX_SEED))
    full_determinism: bool = _field(
        False, "Seed as seed does, and make torch deterministic, process-wide (transformers' "
        "enable_full_determinism): torch.use_deterministic_algorithms(True), cuDNN deterministic without "
        "benchmarking, CUBLAS_WORKSPACE_CONFIG=':16:8', CUDA_LAUNCH_BLOCKING=1. Slow: for debugging.", _bool())
    data_seed: int | None = _field(
        None, "Seed of the data sampler (None: seed).", _int(0, MAX_SEED, allow_none=True))
    bf16: bool = _field(False, "Train with bfloat16 mixed precision.", _bool())
    fp16: bool = _field(False, "Train with float16 mixed precision.", _bool())
    tf32: bool | None = _field(
        None, "TensorFloat-32 for float32 CUDA matmuls and cuDNN convolutions, set process-wide when the Trainer "
        "is built: True (needs an Ampere or newer NVIDIA GPU), False, or None (leave torch's setting).",
        _bool(allow_none=True))
    bf16_full_eval: bool = _field(
        False, "evaluate() / predict() outside train() run the model cast to bfloat16 (not autocast), as "
        "transformers does; the float32 weights are put back afterwards (transformers leaves the model in "
        "bfloat16). Evaluations during train() are not cast.", _bool())
    fp16_full_eval: bool = _field(
        False, "As bf16_full_eval, in float16 (also on the CPU: no gradient scaling is needed to evaluate).",
        _bool())
    use_cpu: bool = _field(False, "Train on the CPU even when an accelerator is available.", _bool())
    dataloader_num_workers: int = _field(
        0, "Worker processes for data loading (0: load in the main process).", _int(low=0))
    dataloader_drop_last: bool = _field(False, "Drop the last incomplete batch.", _bool())
    dataloader_pin_memory: bool = _field(
        True, "Pin batches in page-locked memory for faster copies to the accelerator (no effect on the CPU).",
        _bool())
    dataloader_persistent_workers: bool = _field(
        False, "Keep the data-loading worker processes alive from epoch to epoch and between evaluations (needs "
        "dataloader_num_workers > 0).", _bool())
    dataloader_prefetch_factor: int | None = _field(
        None, "Batches each worker loads ahead (needs dataloader_num_workers > 0); None: torch's default, 2.",
        _int(low=1, allow_none=True))
    dataloader_multiprocessing_context: str | None = _field(
        None, "How worker processes start: 'fork', 'spawn' or 'forkserver' (needs dataloader_num_workers > 0); "
        "None: the platform's default.", _start_method)
    dataloader_in_order: bool = _field(
        True, "Yield batches in the order they were dispatched to the workers. False: as soon as a worker has "
        "one ready (torch >= 2.6; less waiting on a slow batch, but the order, so the run, is no longer "
        "reproducible, and a resume mid-epoch may repeat or miss a few batches). No effect without workers.",
        _bool())
    remove_unused_columns: bool = _field(
        True, "Drop the keys of dict samples that the model's forward does not name (label, label_ids and "
        "label_names kept) before the data collator sees them, as transformers does; False: pass every key.",
        _bool())
    train_sampling_strategy: str = _field(
        "random", "The training order: 'random' (a seeded shuffle each epoch) or 'group_by_length' (transformers' "
        "LengthGroupedSampler: shuffled, then sorted by length within megabatches of 50 x "
        "per_device_train_batch_size x gradient_accumulation_steps, to pad less).", _train_sampling_strategy)
    group_by_length: bool | None = _field(
        None, "transformers 4's name of train_sampling_strategy='group_by_length' (True) or 'random' (False), "
        "used when train_sampling_strategy is not set; it then mirrors it.", _bool(allow_none=True))
    length_column_name: str = _field(
        "length", "For group_by_length: the column of a dataset with columns (a datasets.Dataset) that holds "
        "each item's length; without it the lengths are len(item[model_input_name]).", _str())
    model_input_name: str = _field(
        "input_ids", "For group_by_length without a length column: the item key whose len() is the item's "
        "length (transformers takes its processing_class's first model input name, 'input_ids' without one).",
        _str())
    label_names: list[str] | None = _field(
        None, "The batch keys that hold the labels, collected as label_ids for compute_metrics / predict() "
        "(None: the model forward's arguments named '*label*', else 'labels').", _optional_names)
    prediction_loss_only: bool = _field(
        False, "evaluate() / predict() compute the loss only, collecting no predictions (evaluate() does so "
        "anyway without compute_metrics).", _bool())
    eval_accumulation_steps: int | None = _field(
        None, "transformers moves the collected predictions to the CPU every N eval steps (None: at the end); "
        "optsched's Trainer moves each batch's as it comes, so this changes no result. An integer >= 1 or "
        "None.", _int(low=1, allow_none=True))
    debug: str | list[str] = _field(
        "", "'underflow_overflow': stop training at the first NaN / inf in a module's parameters, inputs or "
        "outputs, and log the last 21 forward frames (each module's |min| and |max|) in transformers' "
        "DebugUnderflowOverflow layout. '' or []: none. Slow: for debugging.", _debug_options)
    include_for_metrics: list[str] | None = _field(
        None, "What compute_metrics also receives in its EvalPrediction: 'inputs' (the batch's main input, "
        "the model's main_input_name, as eval_pred.inputs) and / or 'loss' (each sample's batch loss, as "
        "eval_pred.losses). None: [] (nothing).", _metric_inclusions)
    batch_eval_metrics: bool = _field(
        False, "Call compute_metrics(eval_pred, compute_result=...) on every eval batch (torch tensors, not "
        "kept), compute_result=True on the last one, whose return gives the metrics: statistics accumulated "
        "by the function instead of every prediction kept in memory.", _bool())
    eval_do_concat_batches: bool = _field(
        True, "Concatenate the batches' predictions, label_ids, inputs and losses (sequences of different lengths "
        "padded with -100); False: lists of per-batch arrays (one entry per evaluation step, the processes' "
        "batches of that step together under DDP).", _bool())
    eval_use_gather_object: bool = _field(
        False, "Under DDP, gather every list in the predictions, labels, inputs and losses as one object per "
        "sample, item by item in the dataset's order, as transformers does. False: a list of anything but "
        "tensors (a detection model's labels: a dict per image) is gathered so too, a list of tensors position "
        "by position (one per output or layer).", _bool())
    label_smoothing_factor: float = _field(
        0.0, "Label smoothing epsilon in [0, 1): the Trainer computes the loss from the model's logits as "
        "transformers' LabelSmoother does (0: the model's own loss).", _float(0, 1))
    use_cache: bool = _field(
        False, "The Trainer sets the model's config.use_cache to this when it is built, as transformers' does "
        "(False: no key/value cache is built in training forwards; set it back, or pass use_cache=True to "
        "generate(), for fast generation afterwards).", _bool())
    neftune_noise_alpha: float | None = _field(
        None, "NEFTune: during training, add uniform noise in +-alpha / sqrt(sequence length x hidden size) to "
        "the output of the model's input embeddings (get_input_embeddings()), as transformers does; the hook "
        "is removed when train() returns. A number > 0, or None (off).", _optional_positive)
    activation_checkpointing: bool | None = _field(
        None, "Recompute activations in the backward pass to save memory: before training the Trainer calls "
        "the model's activation_checkpointing_enable() (transformers 5; gradient_checkpointing_enable() on "
        "older models). None: gradient_checkpointing's value, else False.", _bool(allow_none=True))
    activation_checkpointing_kwargs: dict | str | None = _field(
        None, "Arguments for activation_checkpointing_enable() (a dict or a JSON object string): "
        "every_n_layers, offload, and any other key for torch.utils.checkpoint.checkpoint.",
        _optional_kwargs)
    gradient_checkpointing: bool | None = _field(
        None, "transformers 4's name of activation_checkpointing, used when that is unset; it then mirrors it.",
        _bool(allow_none=True))
    gradient_checkpointing_kwargs: dict | str | None = _field(
        None, "transformers 4's name of activation_checkpointing_kwargs, used when that is unset; it then "
        "mirrors it.", _optional_kwargs)
    torch_compile: bool = _field(
        False, "Train (and evaluate) the model through torch.compile, with torch_compile_backend and "
        "torch_compile_mode; checkpoints keep the model's own parameter names.", _bool())
    torch_compile_backend: str | None = _field(
        None, "torch.compile's backend (a name torch._dynamo.list_backends(exclude_tags=None) lists: "
        "'inductor', 'aot_eager', 'eager', ...). Setting it turns torch_compile on; None with torch_compile: "
        "'inductor'.", _compile_backend)
    # mode: inductor's (other backends ignore it, with a warning); transformers' rule as for the backend
    torch_compile_mode: str | None = _field(
        None, "torch.compile's mode ('default', 'reduce-overhead', 'max-autotune', ...); turns torch_compile on.",
        _compile_mode)
    ddp_find_unused_parameters: bool | None = _field(
        None, "DDP's find_unused_parameters (None: transformers' rule, True unless the model is a "
        "transformers model with gradient checkpointing on: a trainable parameter that a step does not "
        "use then trains instead of stopping DDP at the second step).", _bool(allow_none=True))
    ddp_broadcast_buffers: bool | None = _field(
        None, "DDP's broadcast_buffers (None: DDP's default, True).", _bool(allow_none=True))
    ddp_bucket_cap_mb: int | None = _field(
        None, "DDP's bucket_cap_mb (None: DDP's default, 25).", _int(low=1, allow_none=True))
    average_tokens_across_devices: bool = _field(
        True, "Count num_items_in_batch (the labels a step's loss averages over, for a model whose loss uses "
        "it or a compute_loss_func) over every process, so each token weighs the same under DDP "
        "(transformers' default); False: each process normalises by its own count.", _bool())
    ddp_static_graph: bool | None = _field(
        None, "DDP's static_graph (None: DDP's default, False).", _bool(allow_none=True))
    ddp_backend: str | None = _field(
        None, "The torch.distributed backend under torchrun ('nccl', 'gloo', 'mpi', ...; transformers' names). "
        "None: NCCL on CUDA devices, gloo otherwise.", _ddp_backend)
    ddp_timeout: int = _field(
        1800, "Seconds a collective may wait for the other processes before failing (init_process_group's "
        "timeout; transformers' default, 30 minutes).", _int(low=1))
    torch_empty_cache_steps: int | None = _field(
        None, "Every N steps, return the accelerator's cached free memory to the driver after a micro-batch "
        "(torch.cuda.empty_cache(), as transformers does; nothing on the CPU). None: never.",
        _int(low=1, allow_none=True))
    report_to: str | list[str] | None = _field(
        "none", "transformers' integrations to report to ('none', a name, or a list of names); optsched's "
        "Trainer has none: it warns that nothing is sent, and logs to log_history only.", _report_to)
    disable_tqdm: bool | None = _field(
        None, "Disable progress bars (None: disabled when logging is quieter than WARNING).",
        _bool(allow_none=True))
    load_best_model_at_end: bool = _field(
        False, "When train() ends, load the weights of the best checkpoint (by metric_for_best_model, default "
        "'loss') into the model. The evaluation and save strategies must match (unless save_strategy='best'), "
        "save_steps a round multiple of eval_steps; save_total_limit never deletes the best checkpoint.", _bool())
    metric_for_best_model: str | None = _field(
        None, "Metric that decides the best checkpoint ('loss' with load_best_model_at_end and for the "
        "metric-driven schedules).", _str(allow_none=True))
    greater_is_better: bool | None = _field(
        None, "Whether a larger metric is better (None: False for metrics named '*loss').",
        _bool(allow_none=True))
    # Settings that transformers' callbacks read and users choose are fields (run_name, logging_first_step,
    # eval_delay, load_best_model_at_end); the integrations' own settings (trackio's project,
    # hub_private_repo, ...) are left out: a default the user could not change would log to the wrong
    # place without a word, where the AttributeError names what is missing.
    enable_jit_checkpoint: bool = _field(
        False, "transformers' name for a checkpoint on SIGTERM (a preemption). optsched already saves one on "
        "SIGTERM and SIGINT (save_on_signal, save_signals: at the end of the current optimizer step, then "
        "train() returns); True adds SIGTERM to save_signals when missing, and refuses save_on_signal=False.",
        _bool())
    run_name: str | None = _field(
        None, "A name for the run, for the logging callbacks that read it (transformers' wandb, mlflow, comet, "
        "swanlab and trackio integrations); the Trainer itself does not use it.", _str(allow_none=True))

    # ---- optsched's own fields (transformers has none of these; see OPTSCHED_ONLY_FIELDS) ----------
    lr_resume_policy: str = _field(
        "replan", "On resume with a changed plan (schedule, warmup, total steps, group settings): "
        "'replan' (the new schedule from the resumed step, with a warning giving the lr jump), "
        "'continue' (the lr stays continuous; the remaining decay is re-planned to the new end) or "
        "'strict' (an error listing every change).",
        _choice(LR_RESUME_POLICIES, "lr resume policy"))
    save_on_signal: bool = _field(
        True, "On a signal in save_signals (a preemption), finish the current optimizer step, save a "
        "checkpoint at that step and return from train() cleanly. False: the signals keep their "
        "previous handlers.", _bool())
    save_signals: str = _field(
        "SIGTERM,SIGINT", "The signals that trigger save_on_signal: comma-separated names "
        "('SIGTERM,SIGINT', 'SIGUSR1', ...) or a list of names.", _signal_names)
    max_consecutive_nonfinite: int = _field(
        5, "A step whose loss or gradients are NaN/inf is skipped (optimizer and scheduler); up to this "
        "many in a row, the next one stops training with an error. 0: stop at the first one.", _int(low=0))
    checkpoint_verification: str = _field(
        "full", "How a resume checks checkpoint files against checksums.json: 'full' (size and CRC-32 of "
        "every byte; ~25 ms per 600 MB, on a second core beside the load) or 'size' (sizes only: a "
        "truncation is caught, a same-size corruption only if the file's parser notices).",
        _choice(CHECKPOINT_VERIFICATION, "checkpoint verification level"))
    # parameter groups (issue 5): decay policy, rules, layer-wise lr decay (optsched.params)
    decay_policy: str | Callable = _field(
        "hf", "Which parameters get weight decay: 'hf' (not biases and norms, as transformers), 'ndim' "
        "(not tensors of <= 1 dimension, as timm), either with '+no_embeddings' (also not embeddings, "
        "positional embeddings, cls/register tokens), or a callable ParamInfo -> bool (from YAML/CLI: "
        "its import path 'module:function').", _decay_policy)
    param_rules: list[dict] | str | None = _field(
        None, "Ordered parameter rules (a list of dicts; a JSON string from the CLI); the first rule whose "
        "pattern matches a full parameter name decides its settings. Keys: params (a glob such as "
        "'encoder.layer.0.*' or 're:<regex>', or a list of them), name, lr or lr_mult, weight_decay or "
        "wd_mult, freeze, or any optimizer hyperparameter (betas, momentum, use_muon, ...). "
        "See docs/param_groups.md.", _param_rules)
    layerwise_lr_decay: float | None = _field(
        None, "Layer-wise lr decay d in (0, 1]: layer i of L gets lr * d ** (L + 1 - i) (embeddings are "
        "layer 0, the head L + 1). None: off.", _layerwise_lr_decay)
    layer_id_fn: str | Callable | None = _field(
        None, "For layerwise_lr_decay: a function name -> block index (the N of 'layers.N') or None, "
        "as an import path 'module:function' (or a callable from Python). None: inferred from the "
        "names (layer.N, layers.N, h.N, block.N, blocks.N, resblocks.N).", _layer_id_fn)

    # ---- validation ---------------------------------------------------------------------------

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check = f.metadata.get("check")
            if check is not None:
                object.__setattr__(self, f.name, check(f.name, getattr(self, f.name)))
        for rule in _CROSS_FIELD_RULES:
            rule(self)

    def __setattr__(self, name: str, value: Any) -> None:
        # After construction, an assignment is checked (one field; see the class docstring) and
        # remembered as explicit: ``args.optim = "sgd"`` means the user chose "sgd".
        if self.__dict__.get("_tracking") and name in _FIELDS:
            check = _FIELDS[name].metadata.get("check")
            if check is not None:
                value = check(name, value)
            object.__setattr__(self, "_explicit_fields", self.explicit_fields | {name})
        object.__setattr__(self, name, value)

    # ---- explicit fields ----------------------------------------------------------------------

    @property
    def explicit_fields(self) -> frozenset[str]:
        """The fields the caller set: passed to the constructor, assigned later, or changed by
        :func:`dataclasses.replace`. For an object converted by :func:`as_training_arguments` or
        :meth:`from_dict`, the fields whose value differs from the default."""
        return self.__dict__.get("_explicit_fields", frozenset())

    def is_explicit(self, name: str) -> bool:
        """Whether the field ``name`` was set by the caller (see :attr:`explicit_fields`).

        Raises:
            ValueError: ``name`` is not a field.
        """
        if name not in _FIELDS:
            raise ValueError(
                f"name={name!r} is not a TrainingArguments field.{did_you_mean(name, _FIELDS)} "
                f"Accepted: {', '.join(_FIELDS)}."
            )
        return name in self.explicit_fields

    # ---- warmup --------------------------------------------------------------------------------

    @property
    def warmup(self) -> int | float:
        """The warmup as given: ``warmup_steps`` when non-zero, else ``warmup_ratio`` (0 when neither).

        A value of 1.0 is ambiguous here (one step, or all of ``warmup_ratio``): :meth:`get_warmup_steps`
        gives the number of steps.
        """
        return self.warmup_steps if self.warmup_steps != 0 else self.warmup_ratio

    def get_warmup_steps(self, num_training_steps: int) -> int:
        """Number of warmup steps for a run of ``num_training_steps`` optimizer steps.

        With ``w`` = ``warmup_steps``, ``r`` = ``warmup_ratio`` and ``T`` = ``num_training_steps``
        (transformers' formulas, 5 and 4)::

            warmup = int(w)          if w >= 1       (a step count)
                     ceil(T * w)     if 0 < w < 1    (a fraction)
                     ceil(T * r)     if w == 0       (always a fraction: r = 1.0 is T steps; r = 0 gives 0)

        The fraction is rounded up, so any ``w > 0`` (or ``r > 0``) gives at least one step when ``T > 0``; the
        product is computed in floating point exactly as transformers does (``ceil(100 * 0.07)`` is 8
        because ``100 * 0.07 == 7.000000000000001``). A warmup longer than ``T`` is returned as is.

        Raises:
            TypeError: ``num_training_steps`` is not an integer.
            ValueError: ``num_training_steps`` < 0.
        """
        total = check_int("num_training_steps", num_training_steps, low=0)
        if self.warmup_steps == 0:  # transformers 4's warmup_ratio, a fraction in [0, 1]
            return math.ceil(total * self.warmup_ratio)
        w = self.warmup_steps
        return int(w) if w >= 1 else math.ceil(total * w)

    # ---- serialisation -------------------------------------------------------------------------

    def to_dict(self, *, include_explicit_fields: bool = False) -> dict[str, Any]:
        """The fields as a JSON-serialisable dict (a deep copy), in declaration order.

        Args:
            include_explicit_fields: also store the sorted explicit field names under
                ``"_explicit_fields"``, so that :meth:`from_dict` restores them exactly.
        """
        out = {f.name: _serialisable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        if include_explicit_fields:
            out["_explicit_fields"] = sorted(self.explicit_fields)
        return out

    def to_json_string(self, *, include_explicit_fields: bool = False) -> str:
        """:meth:`to_dict` as indented JSON (transformers writes ``training_args`` the same way)."""
        return json.dumps(self.to_dict(include_explicit_fields=include_explicit_fields), indent=2)

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        *,
        explicit_fields: Iterable[str] | None = None,
        ignore_unknown: bool = False,
    ) -> TrainingArguments:
        """Rebuild from :meth:`to_dict` output (or any mapping of field values, e.g. a parsed CLI).

        The explicit fields are, in order of preference: ``explicit_fields`` (a CLI knows which flags
        were given), the ``"_explicit_fields"`` entry of ``data``, or else the fields whose value
        differs from the default (as :func:`as_training_arguments` does).

        Args:
            data: field values.
            explicit_fields: the names of the fields the user set.
            ignore_unknown: drop keys that are not fields (e.g. the other fields of a transformers
                ``training_args.json``) instead of raising ``TypeError``; dropped keys are logged.

        Raises:
            TypeError: ``data`` is not a mapping, or has an unknown key and ``ignore_unknown`` is False.
            ValueError: ``explicit_fields`` names something that is not a field; a bad field value.
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"data must be a mapping of field values, got {type(data).__name__} {data!r}.")
        values = dict(data)
        stored = values.pop("_explicit_fields", None)
        explicit = explicit_fields if explicit_fields is not None else stored
        if ignore_unknown:
            dropped = sorted(str(k) for k in values if k not in _FIELDS)
            if dropped:
                logger.debug("TrainingArguments.from_dict ignores keys that are not fields: %s", dropped)
            values = {k: v for k, v in values.items() if k in _FIELDS}
        if explicit is None:
            return _with_inferred_explicit(cls, values)
        if isinstance(explicit, str) or not all(isinstance(n, str) and n in _FIELDS for n in explicit):
            raise ValueError(
                f"explicit_fields={explicit!r} is not a list of field names; accepted: names among "
                f"{', '.join(_FIELDS)}."
            )
        args = cls(**values)
        object.__setattr__(args, "_explicit_fields", frozenset(explicit))
        return args

    def __repr__(self) -> str:
        """``TrainingArguments(name=value, ...)`` with the fields that differ from the default; it
        evaluates back to an equal object."""
        defaults = _default_values()
        parts = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != defaults.get(f.name, dataclasses.MISSING)
        ]
        return f"{type(self).__name__}({', '.join(parts)})"


_FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainingArguments)}
_FIELD_NAMES: tuple[str, ...] = tuple(_FIELDS)
#: Fields that ``__post_init__`` derives from others when left unset; a ``replace`` that does not set
#: them explicitly derives them again (transformers keeps the stale value).
_DERIVED = ("eval_steps", "metric_for_best_model", "greater_is_better", "group_by_length", "torch_compile",
            "torch_compile_backend")


# --------------------------------------------------------------------------------------------------
# Rules across fields, run in order after the per-field checks. Each takes the object and may
# normalise it; a new rule is one function appended to ``_CROSS_FIELD_RULES``.
# --------------------------------------------------------------------------------------------------


def _set(args: TrainingArguments, name: str, value: Any) -> None:
    object.__setattr__(args, name, value)


def _check_warmup(args: TrainingArguments) -> None:
    steps, ratio = args.warmup_steps, args.warmup_ratio
    # Both set agree only as the same fraction: warmup_steps=1 is one step, warmup_ratio=1.0 the whole run.
    if steps != 0 and ratio != 0 and (steps >= 1 or steps != ratio):
        raise ValueError(
            f"warmup_steps={steps!r} and warmup_ratio={ratio!r} conflict; accepted: one of them "
            "(warmup_steps as steps or a fraction in (0, 1), or warmup_ratio as a fraction), not both."
        )


def _resolve_activation_checkpointing(args: TrainingArguments) -> None:
    """transformers 5: ``gradient_checkpointing(_kwargs)`` stand for ``activation_checkpointing(_kwargs)``
    when those are unset, then mirror them; an unset flag is False."""
    for old, new in (("gradient_checkpointing", "activation_checkpointing"),
                     ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")):
        if getattr(args, new) is None and getattr(args, old) is not None:
            _set(args, new, getattr(args, old))
        _set(args, old, getattr(args, new))
    if args.activation_checkpointing is None:
        _set(args, "activation_checkpointing", False)
        _set(args, "gradient_checkpointing", False)


def _resolve_group_by_length(args: TrainingArguments) -> None:
    """transformers 4's ``group_by_length`` stands for ``train_sampling_strategy`` (True: "group_by_length",
    False: "random") unless only that was set; then it mirrors it. Both set, and disagreeing, is refused."""
    flag, strategy = args.group_by_length, args.train_sampling_strategy
    if flag is not None and (strategy == "group_by_length") != flag:
        if "train_sampling_strategy" in args.explicit_fields:
            if "group_by_length" in args.explicit_fields:
                raise ValueError(
                    f"group_by_length={flag!r} and train_sampling_strategy={strategy!r} conflict; accepted: one of "
                    "them (group_by_length is transformers 4's name of train_sampling_strategy='group_by_length'), "
                    "or both saying the same."
                )
        else:
            _set(args, "train_sampling_strategy", "group_by_length" if flag else "random")
    _set(args, "group_by_length", args.train_sampling_strategy == "group_by_length")


def torch_compile_settings(args: Any) -> tuple[str, str | None] | None:
    """``(backend, mode)`` when ``args`` ask for ``torch.compile``, else ``None``: transformers' rule, a
    ``torch_compile_backend`` or ``torch_compile_mode`` turns ``torch_compile`` on, whose backend is then
    :data:`DEFAULT_COMPILE_BACKEND` unless given. ``__post_init__`` applies it; the Trainer applies it
    again, since a field assigned after construction is not re-derived."""
    backend = getattr(args, "torch_compile_backend", None)
    mode = getattr(args, "torch_compile_mode", None)
    if not (getattr(args, "torch_compile", False) or backend is not None or mode is not None):
        return None
    return backend or DEFAULT_COMPILE_BACKEND, mode


def _resolve_torch_compile(args: TrainingArguments) -> None:
    settings = torch_compile_settings(args)
    if settings is not None:
        _set(args, "torch_compile", True)
        _set(args, "torch_compile_backend", settings[0])


def _check_worker_options(args: TrainingArguments) -> None:
    """The worker options need worker processes (transformers checks prefetch_factor here; torch's DataLoader
    refuses the other two only when the Trainer builds it)."""
    if args.dataloader_num_workers > 0:
        return
    for name, unset in (("dataloader_prefetch_factor", None), ("dataloader_persistent_workers", False),
                        ("dataloader_multiprocessing_context", None)):
        value = getattr(args, name)
        if value != unset:
            raise ValueError(
                f"{name}={value!r} applies to worker processes, but dataloader_num_workers=0 loads the data in "
                f"the main process; accepted: dataloader_num_workers > 0, or {name}={unset!r}."
            )


def _check_in_order(args: TrainingArguments) -> None:
    """``dataloader_in_order=False`` needs torch's DataLoader argument (torch 2.6), which transformers passes
    whatever the torch, failing there with a ``TypeError`` from the DataLoader."""
    if args.dataloader_in_order:
        return
    import inspect

    from torch.utils.data import DataLoader

    if "in_order" not in inspect.signature(DataLoader.__init__).parameters:
        import torch

        raise ValueError(
            f"dataloader_in_order=False needs torch's DataLoader(in_order=...), from torch 2.6; torch "
            f"{torch.__version__} is installed; accepted: dataloader_in_order=True, or torch >= 2.6."
        )


def _check_jit_checkpoint(args: TrainingArguments) -> None:
    """``enable_jit_checkpoint`` (transformers' SIGTERM checkpoint) is optsched's ``save_on_signal`` with
    SIGTERM among ``save_signals``: added there when missing; ``save_on_signal=False`` contradicts it."""
    if not args.enable_jit_checkpoint:
        return
    if not args.save_on_signal:
        raise ValueError(
            "enable_jit_checkpoint=True saves a checkpoint on SIGTERM, which save_on_signal=False turns off; "
            "accepted: save_on_signal=True (the default), or enable_jit_checkpoint=False."
        )
    if "SIGTERM" not in args.save_signals.split(","):
        _set(args, "save_signals", args.save_signals + ",SIGTERM")


def _check_mixed_precision(args: TrainingArguments) -> None:
    if args.fp16 and args.bf16:
        raise ValueError("fp16=True and bf16=True conflict; accepted: at most one of them True.")
    if args.fp16_full_eval and args.bf16_full_eval:
        raise ValueError("fp16_full_eval=True and bf16_full_eval=True conflict; accepted: at most one of them True.")


def _check_step_intervals(args: TrainingArguments) -> None:
    """transformers: a "steps" strategy needs a non-zero interval; eval_steps falls back to logging_steps."""
    if args.logging_strategy == "steps" and args.logging_steps == 0:
        raise ValueError("logging_steps=0 with logging_strategy='steps'; accepted: an integer >= 1 or a "
                         "float in (0, 1), or another logging_strategy.")
    if args.save_strategy == "steps" and args.save_steps == 0:
        raise ValueError("save_steps=0 with save_strategy='steps'; accepted: an integer >= 1 or a "
                         "float in (0, 1), or another save_strategy.")
    if args.eval_strategy == "steps" and not args.eval_steps:
        if args.logging_steps == 0:
            raise ValueError(
                f"eval_steps={args.eval_steps!r} with eval_strategy='steps' and logging_steps=0; accepted: "
                "a non-zero eval_steps (or logging_steps, which eval_steps defaults to)."
            )
        logger.info("eval_steps defaults to logging_steps=%r", args.logging_steps)
        _set(args, "eval_steps", args.logging_steps)


def _check_optim_args(args: TrainingArguments) -> None:
    if args.optim_args is not None:
        from optsched.optim import parse_optim_args

        try:
            parse_optim_args(args.optim, args.optim_args)  # raises ValueError naming the bad key
        except (TypeError, ValueError) as exc:
            raise _naming("optim_args", args.optim_args, exc) from None


def _check_scheduler_kwargs(args: TrainingArguments) -> None:
    from optsched.schedules import validate_scheduler_kwargs

    try:
        validate_scheduler_kwargs(args.lr_scheduler_type, args.lr_scheduler_kwargs)
    except (TypeError, ValueError) as exc:
        raise _naming("lr_scheduler_kwargs", args.lr_scheduler_kwargs, exc) from None


def _derive_best_metric(args: TrainingArguments) -> None:
    if args.metric_for_best_model is None and (args.load_best_model_at_end or args.lr_scheduler_type in METRIC_SCHEDULES):
        _set(args, "metric_for_best_model", "loss")
    if args.save_strategy == "best":
        # "best" saves when an evaluation improves the metric: without either, nothing is ever saved
        # (transformers' Trainer refuses a missing metric too).
        if args.metric_for_best_model is None:
            raise ValueError("save_strategy='best' needs metric_for_best_model, which is None; accepted: a "
                             "metric name the evaluation returns ('loss', 'eval_loss', ...), or another save_strategy.")
        if args.eval_strategy == "no":
            raise ValueError("save_strategy='best' with eval_strategy='no' never saves (no evaluation, no best "
                             "metric); accepted: eval_strategy='steps' or 'epoch', or another save_strategy.")
    if args.greater_is_better is None and args.metric_for_best_model is not None:
        _set(args, "greater_is_better", not args.metric_for_best_model.endswith("loss"))


def _check_load_best_model(args: TrainingArguments) -> None:
    """transformers' rule: ``load_best_model_at_end`` needs a checkpoint at every evaluation that may find the
    best, so (unless ``save_strategy="best"``, which saves exactly those) the save and eval strategies match
    and ``save_steps`` is a round multiple of ``eval_steps`` (both step counts, or both ratios)."""
    if not args.load_best_model_at_end or args.save_strategy == "best":
        return
    save, evaluate = args.save_strategy, args.eval_strategy
    if save != evaluate:
        raise ValueError(
            f"load_best_model_at_end=True needs save_strategy and eval_strategy to match, but save_strategy={save!r} "
            f"and eval_strategy={evaluate!r}; accepted: the same strategy for both, or save_strategy='best'."
        )
    if evaluate != "steps" or args.save_steps % args.eval_steps == 0:
        return
    save_steps, eval_steps = args.save_steps, args.eval_steps
    if (save_steps < 1) != (eval_steps < 1):
        raise ValueError(
            f"load_best_model_at_end=True needs save_steps to be a multiple of eval_steps, which save_steps="
            f"{save_steps!r} and eval_steps={eval_steps!r} (a ratio and a step count) cannot guarantee; accepted: "
            "both step counts or both ratios, save_steps a multiple of eval_steps."
        )
    # ratios compared in millionths, as transformers does: 0.5 % 0.1 is not 0 in floating point
    if save_steps >= 1 or (save_steps * 10**6) % (eval_steps * 10**6) != 0:
        raise ValueError(
            f"load_best_model_at_end=True needs save_steps to be a round multiple of eval_steps, but save_steps="
            f"{save_steps!r} is not a multiple of eval_steps={eval_steps!r}; accepted: save_steps = k x eval_steps "
            "(a checkpoint at every k-th evaluation), or save_strategy='best'."
        )


def _derive_disable_tqdm(args: TrainingArguments) -> None:
    if args.disable_tqdm is None:
        _set(args, "disable_tqdm", logging.getLogger("optsched").getEffectiveLevel() > logging.WARNING)


_CROSS_FIELD_RULES: tuple[Callable[[TrainingArguments], None], ...] = (
    _check_warmup,
    _resolve_activation_checkpointing,
    _resolve_group_by_length,
    _resolve_torch_compile,
    _check_mixed_precision,
    _check_worker_options,
    _check_in_order,
    _check_jit_checkpoint,
    _check_step_intervals,
    _check_optim_args,
    _check_scheduler_kwargs,
    _derive_best_metric,
    _check_load_best_model,
    _derive_disable_tqdm,
)


# --------------------------------------------------------------------------------------------------
# Explicit-field tracking: wrap the generated __init__.
# --------------------------------------------------------------------------------------------------

# ``dataclasses.replace`` (and ``copy.replace`` on 3.13) build the new object by calling the class
# with every field; the function that does so is recognised by its code object, and its first
# argument (``obj``; ``self`` in 3.13's ``dataclasses._replace``) is the source, whose values
# identify which fields the caller actually changed.
_REPLACE_CODES = frozenset(
    fn.__code__ for fn in (getattr(dataclasses, "replace", None), getattr(dataclasses, "_replace", None))
    if fn is not None and hasattr(fn, "__code__")
)
_dataclass_init = TrainingArguments.__init__


def _replace_source(frame: Any) -> TrainingArguments | None:
    if frame is None or frame.f_code not in _REPLACE_CODES:
        return None
    source = frame.f_locals.get("obj", frame.f_locals.get("self"))
    return source if isinstance(source, TrainingArguments) else None


@functools.wraps(_dataclass_init)
def _tracking_init(self: TrainingArguments, *args: Any, **kwargs: Any) -> None:
    unknown = [name for name in kwargs if name not in _FIELDS]
    if unknown:
        name = unknown[0]
        raise TypeError(
            f"{type(self).__name__} got an unexpected keyword argument {name!r}."
            f"{did_you_mean(name, _FIELDS)} "
            f"Accepted: {', '.join(_FIELD_NAMES)}."
        )
    passed = set(_FIELD_NAMES[: len(args)]) | set(kwargs)
    source = _replace_source(sys._getframe(1))
    if source is None:
        explicit = passed
    else:
        changed = {name for name, value in kwargs.items() if value is not getattr(source, name, None)}
        explicit = source.explicit_fields | changed
        for name in _DERIVED:  # derive again from the new values unless the user set them
            if name in kwargs and name not in explicit:
                kwargs[name] = _FIELDS[name].default
    object.__setattr__(self, "_tracking", False)
    object.__setattr__(self, "_explicit_fields", frozenset(explicit))
    _dataclass_init(self, *args, **kwargs)
    object.__setattr__(self, "_tracking", True)


TrainingArguments.__init__ = _tracking_init  # type: ignore[method-assign]


def _default_values() -> dict[str, Any]:
    """The field values of ``TrainingArguments()`` (normalised), for comparisons."""
    return TrainingArguments().to_dict()


def _with_inferred_explicit(cls: type[TrainingArguments], values: dict[str, Any]) -> TrainingArguments:
    """Build from ``values`` and mark explicit the fields whose value differs from the default.

    A derived field (``eval_steps``, ...) counts as explicit only when it differs from what the other
    explicit fields would derive, so a later ``replace(args, logging_steps=...)`` derives it again.
    """
    args = cls(**values)
    defaults = _default_values()
    primary = {k for k in _FIELD_NAMES if k not in _DERIVED and getattr(args, k) != defaults[k]}
    try:
        base = cls(**{k: getattr(args, k) for k in primary}).to_dict()
    except (TypeError, ValueError):  # a derived value was needed for validity: it is explicit
        base = defaults
    derived = {k for k in _DERIVED if getattr(args, k) != base[k]}
    object.__setattr__(args, "_explicit_fields", frozenset(primary | derived))
    return args


# --------------------------------------------------------------------------------------------------
# Conversion from other argument objects
# --------------------------------------------------------------------------------------------------


def _read_foreign(obj: Any) -> dict[str, Any]:
    """Field values read by attribute from a transformers (4 or 5) ``TrainingArguments``-like object."""
    values: dict[str, Any] = {}
    for name in _FIELD_NAMES:
        if hasattr(obj, name):
            value = getattr(obj, name)
            if isinstance(value, (list, tuple)):
                value = [_plain(v) for v in value]
            values[name] = _plain(value)
    steps = values.get("warmup_steps", 0)
    if isinstance(steps, numbers.Real) and not isinstance(steps, bool) and steps >= 1:
        values["warmup_steps"] = int(steps)  # transformers truncates a float step count
    # transformers 4: warmup_steps > 0 overrides warmup_ratio (logged there), so keep only the one used.
    if steps and values.get("warmup_ratio"):
        logger.info("warmup_steps=%r overrides warmup_ratio=%r (transformers 4 semantics)",
                    steps, values["warmup_ratio"])
        values.pop("warmup_ratio")
    if values.get("optim_args") == "":
        values["optim_args"] = None
    return values


def as_training_arguments(args: Any = None) -> TrainingArguments:
    """Return optsched :class:`TrainingArguments` for whatever arguments object the caller has.

    * ``None`` -> the defaults.
    * an optsched :class:`TrainingArguments` -> itself (not a copy).
    * a mapping -> ``TrainingArguments(**mapping)`` (unknown keys raise ``TypeError``).
    * any other object with a ``learning_rate`` attribute (a ``transformers.TrainingArguments``,
      4 or 5, an ``argparse.Namespace``, ...) -> read by attribute, transformers is never imported:
      enums become their values, transformers' float ``warmup_steps`` >= 1 is truncated as
      transformers does, transformers 4's ``warmup_ratio`` is kept when ``warmup_steps`` is 0. The
      explicit fields are those whose value differs from optsched's default.

    Raises:
        TypeError: ``args`` is none of the above (an int, a string, ...).
        ValueError: a value that optsched refuses (the message names the field).
    """
    if args is None:
        return TrainingArguments()
    if isinstance(args, TrainingArguments):
        return args
    if isinstance(args, Mapping):
        for key in args:
            if not isinstance(key, str):
                raise TypeError(f"args keys must be field names (str), got {type(key).__name__} {key!r}.")
        return TrainingArguments(**args)
    if isinstance(args, (str, bytes, numbers.Number)) or not hasattr(args, "learning_rate"):
        raise TypeError(
            "args must be an optsched.TrainingArguments, a transformers.TrainingArguments, a mapping of "
            f"field values or None, got {type(args).__name__} {args!r}."
        )
    _warn_ignored_fields(args)
    return _with_inferred_explicit(TrainingArguments, _read_foreign(args))


#: transformers fields set in its ``__post_init__`` from others (``do_eval`` from ``eval_strategy``), and
#: ``do_train`` / ``do_predict``, which its Trainer does not read either (they are for scripts).
_DERIVED_FOREIGN_FIELDS = frozenset(
    {"accelerator_config", "logging_dir", "hub_model_id", "do_eval", "do_train", "do_predict",
     # transformers 4 (deprecated there, gone in 5) adds "inputs" to include_for_metrics for it
     "include_inputs_for_metrics"}
)


def _warn_ignored_fields(obj: Any) -> None:
    """Log a warning listing the fields of a transformers ``TrainingArguments`` that were changed from
    transformers' defaults but that optsched does not read (``load_best_model_at_end``,
    ``label_smoothing_factor``, ...): they would otherwise be dropped without a word."""
    if not dataclasses.is_dataclass(obj) or not type(obj).__module__.startswith("transformers."):
        return
    ignored = []
    for f in dataclasses.fields(obj):
        if f.name in _FIELDS or f.name in _DERIVED_FOREIGN_FIELDS or f.name.startswith("_"):
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            continue
        value = getattr(obj, f.name, default)
        if value != default and (value or default):  # False for None, [] for "": normalised, not set
            ignored.append(f"{f.name}={_plain(value)!r}")
    if ignored:
        logger.warning(
            "%s fields that optsched does not use are set and ignored: %s.", type(obj).__name__, ", ".join(ignored)
        )
