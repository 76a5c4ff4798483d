"""Parity sweep: does optsched put the same parameters in decay / no-decay as transformers' Trainer?

For every model class in transformers' auto mappings (the base models of ``MODEL_MAPPING_NAMES``
and the heads of a few task mappings, see ``MAPPINGS``), the sweep builds a tiny model from its
config class alone (no hub access) and compares two groupings of its parameters:

* **transformers**: what ``Trainer.create_optimizer`` does in transformers 5.x, without a Trainer:
  ``decay = Trainer.get_decay_parameter_names(None, model)`` (the method never reads ``self``);
  the first group holds ``p`` for ``n, p in model.named_parameters()`` with ``n in decay and
  p.requires_grad`` (``weight_decay=args.weight_decay``), the second the other trainable ones
  (``weight_decay=0.0``). ``--trainer`` checks this shortcut against a real
  ``transformers.Trainer(...).create_optimizer()`` (by default on every mismatching CPU model).
* **optsched**: ``optsched.create_optimizer(model, optsched.TrainingArguments(weight_decay=0.01,
  optim="adamw_torch"))`` (the default ``"hf"`` decay policy); its ``param_groups`` tensors are
  mapped back to names.

Parameters are compared by name: the first name ``named_parameters()`` gives a tied tensor. Each
model is compared twice: with every parameter trainable (the decay / no-decay decisions), then with
every third tensor frozen (``requires_grad=False``), where each side's groups must hold exactly the
trainable tensors and the decisions must not change.

A model is built with a shrunken config (hidden 32, 2 layers, vocab 128, ...) on CPU; if that
fails, with the default config on the ``meta`` device (tensors without storage: grouping reads only
names, module types and ``requires_grad``); configs whose default backbone needs timm get a
transformers ``ResNetConfig`` backbone. Failures and time-outs are counted as skipped.

Every mismatching parameter is reported with the side that decays it, the class of the module that
owns it, and the rule that decided each side: transformers' ``nn.LayerNorm`` type test (its
``get_parameter_names(model, [nn.LayerNorm], ...)``; ``ALL_LAYERNORM_LAYERS`` is that one class),
one of its ``forbidden_name_patterns`` (``bias``, ``layernorm``, ``rmsnorm``, ``norm`` as a
component, ``_norm``), or none; optsched's copy of that rule (inside a transformers model) or its
robust rule (``optsched.params.classify``).

``tests/params/test_params_hf_sweep.py`` runs the same sweep in the test suite. Run it by hand from
the repository root (about a minute on 2 cores; ``--trainer all`` adds several)::

    python tests/params/hf_grouping_sweep.py [--only llama,resnet] [--trainer none|mismatches|all]
                                           [--timeout 60] [--json out.json] [--verbose]

Prints the counts (built / skipped / identical / mismatched), then every mismatch grouped by cause
(per architecture: how many parameters, the module classes, up to three names; ``--json`` keeps
every name), then the most common reasons for skipping.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import os
import re
import signal
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

#: transformers' auto mappings swept, in this order; a model class listed twice is built once.
MAPPINGS = (
    "MODEL_MAPPING_NAMES",
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
    "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES",
    "MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES",
    "MODEL_FOR_CTC_MAPPING_NAMES",
)

#: transformers' ``forbidden_name_patterns`` in ``Trainer.get_decay_parameter_names`` (5.x).
HF_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")

#: Integer config fields lowered to these values wherever a config (or sub-config) has them.
SMALL_INTS = {
    "hidden_size": 32, "d_model": 32, "n_embd": 32, "embed_dim": 32, "dim": 32, "model_dim": 32,
    "emb_dim": 32, "word_embed_proj_dim": 32, "projection_dim": 32, "embedding_size": 32,
    "intermediate_size": 64, "d_ff": 64, "ffn_dim": 64, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
    "n_inner": 64, "hidden_dim": 64, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
    "num_hidden_layers": 2, "num_layers": 2, "n_layer": 2, "n_layers": 2, "encoder_layers": 2,
    "decoder_layers": 2, "num_decoder_layers": 2, "num_encoder_layers": 2,
    "num_attention_heads": 2, "num_heads": 2, "n_head": 2, "n_heads": 2, "encoder_attention_heads": 2,
    "decoder_attention_heads": 2, "num_key_value_heads": 1, "num_kv_heads": 1,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "vocab_size": 128, "max_position_embeddings": 64, "n_positions": 64, "depth": 2,
}  # fmt: skip

#: Mismatch categories, in report order (see :func:`category`).
CATEGORIES = {
    "robust-rule": "outside any transformers model, where optsched's robust rule applies (norms also by type, "
                   "'bias' as a word): a difference by design",
    "frozen": "frozen tensors handled differently",
    "other": "inside a transformers model: optsched's copy of transformers' rule disagrees with it (a bug)",
}  # fmt: skip


@dataclass
class Outcome:
    """The result for one model class."""

    label: str  # "<model_type>/<ModelClass>"
    status: str  # "identical", "mismatch", "error" (the comparison raised) or "skipped" (not built)
    how: str = ""  # how it was built ("tiny/cpu", "default/meta", ...), or why it was skipped
    n_params: int = 0
    trainer_checked: bool = False
    diffs: list[dict] = field(default_factory=list)


class BuildTimeout(Exception):
    """A build or comparison ran past ``--timeout``."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise :class:`BuildTimeout` in the main thread after ``seconds`` (checked between bytecodes)."""

    def on_alarm(signum, frame):
        raise BuildTimeout(f"timed out after {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ----------------------------------------------------------------------------------------- building


def shrink_config(config, seen: set[int] | None = None):
    """Lower the common size fields of ``config`` and of its nested sub-configs, in place."""
    from transformers import PretrainedConfig

    seen = set() if seen is None else seen
    if id(config) in seen:
        return config
    seen.add(id(config))
    for key, value in list(vars(config).items()):
        if isinstance(value, PretrainedConfig):
            shrink_config(value, seen)
        elif key in SMALL_INTS and isinstance(value, int) and not isinstance(value, bool):
            _set(config, key, min(value, SMALL_INTS[key]))
        elif key in ("depths", "num_layers_per_stage", "layers") and _int_list(value):
            _set(config, key, [1] * len(value))
        elif key in ("hidden_sizes", "embed_dims", "dims", "widths") and _int_list(value):
            _set(config, key, [16 * (i + 1) for i in range(len(value))])
        elif key == "num_heads" and _int_list(value):
            _set(config, key, [1] * len(value))
    # Keep a few derived fields consistent with the lowered ones.
    hidden, heads, layers = (
        _get(config, k) for k in ("hidden_size", "num_attention_heads", "num_hidden_layers")
    )
    if isinstance(_get(config, "head_dim"), int) and isinstance(hidden, int) and isinstance(heads, int):
        _set(config, "head_dim", max(hidden // heads, 8))
    if isinstance(_get(config, "layer_types"), list) and isinstance(layers, int):
        _set(config, "layer_types", config.layer_types[:layers])
    vocab = _get(config, "vocab_size")
    if isinstance(vocab, int):
        for key in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id"):
            token = _get(config, key)
            if isinstance(token, int) and token >= vocab:
                _set(config, key, vocab - 1)
    return config


def _get(config, key: str):
    """``getattr(config, key, None)``, also ``None`` where the config refuses the read."""
    try:
        return getattr(config, key, None)
    except Exception:  # noqa: BLE001 - e.g. a per-layer attribute read globally
        return None


def _set(config, key: str, value) -> None:
    """``setattr`` that leaves read-only or validated fields alone when they refuse the value."""
    with contextlib.suppress(Exception):
        setattr(config, key, value)


def _int_list(value) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, int) for v in value)


def _resnet_backbone_config(config_cls):
    """The default config with a transformers ResNet backbone in place of a timm one (DETR family)."""
    from transformers import ResNetConfig

    return config_cls(backbone_config=ResNetConfig(out_features=["stage2", "stage3", "stage4"]))


def build_model(model_cls, config_cls, timeout: float) -> tuple[nn.Module, str]:
    """Build ``model_cls`` tiny on CPU, else with the default config on ``meta``, else with a ResNet backbone.

    Returns:
        ``(model, how)``.

    Raises:
        RuntimeError: every attempt failed (the message lists each attempt's error).
    """
    attempts = (
        ("tiny/cpu", lambda: shrink_config(config_cls()), "cpu"),
        ("default/meta", config_cls, "meta"),
        ("tiny+resnet-backbone/cpu", lambda: shrink_config(_resnet_backbone_config(config_cls)), "cpu"),
    )
    errors = []
    for how, make_config, device in attempts:
        try:
            with time_limit(timeout), warnings.catch_warnings(), torch.device(device):
                warnings.simplefilter("ignore")
                return model_cls(make_config()), how
        except Exception as error:  # noqa: BLE001 - any failure skips the architecture
            first_line = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
            errors.append(f"{how}: {type(error).__name__}: {first_line}")
    raise RuntimeError(" | ".join(errors))


def model_classes(only: set[str] | None, mappings: tuple[str, ...] = MAPPINGS):
    """Yield ``(label, model class, config class, import error)`` for every distinct class in ``mappings``.

    A class is yielded under the first mapping of :data:`MAPPINGS` that lists it, also when only
    later mappings are asked for, so that sweeps of single mappings never repeat a class.
    """
    import transformers
    from transformers.models.auto import configuration_auto, modeling_auto

    seen = set()
    for mapping_name in MAPPINGS:
        for model_type, class_names in getattr(modeling_auto, mapping_name).items():
            for class_name in [class_names] if isinstance(class_names, str) else class_names:
                if class_name in seen:
                    continue
                seen.add(class_name)
                if mapping_name not in mappings or (only and model_type not in only):
                    continue
                label = f"{model_type}/{class_name}"
                try:
                    model_cls = getattr(transformers, class_name)
                    config_cls = getattr(transformers, configuration_auto.CONFIG_MAPPING_NAMES[model_type])
                except Exception as error:  # noqa: BLE001
                    yield label, None, None, f"import: {type(error).__name__}: {error}"
                    continue
                yield label, model_cls, config_cls, ""


def sweep(
    only: set[str] | None = None,
    mappings: tuple[str, ...] = MAPPINGS,
    timeout: float = 60.0,
    trainer: str = "none",
    verbose: bool = False,
) -> list[Outcome]:
    """Build and compare every model class of ``mappings`` (``only``: these model types); one outcome each."""
    outcomes: list[Outcome] = []
    for label, model_cls, config_cls, import_error in model_classes(only, mappings):
        outcome = Outcome(label, "skipped", import_error)
        if model_cls is not None:
            try:
                model, outcome.how = build_model(model_cls, config_cls, timeout)
            except RuntimeError as error:
                outcome.how = str(error)
            else:
                outcome = run_one(model, outcome, timeout, trainer)
                del model
        outcomes.append(outcome)
        if verbose:
            print(f"{outcome.status:9} {label}: {outcome.how[:200]}", flush=True)
    return outcomes


# ----------------------------------------------------------------------------------------- grouping


def hf_groups(model: nn.Module) -> tuple[list[str], list[str]]:
    """transformers' ``Trainer.create_optimizer`` groups, as names: ``(decay, no_decay)``."""
    from transformers import Trainer

    decay_parameters = set(Trainer.get_decay_parameter_names(None, model))  # same test as HF's list
    named = list(model.named_parameters())
    return (
        [n for n, p in named if n in decay_parameters and p.requires_grad],
        [n for n, p in named if n not in decay_parameters and p.requires_grad],
    )


def hf_trainer_groups(model: nn.Module) -> tuple[list[str], list[str]]:
    """The same groups from a real ``transformers.Trainer(...).create_optimizer()`` (CPU models only)."""
    import transformers

    names = {id(p): n for n, p in model.named_parameters()}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = transformers.TrainingArguments(
            output_dir=tmp, weight_decay=0.01, report_to=[], use_cpu=True, optim="adamw_torch"
        )
        optimizer = transformers.Trainer(model=model, args=args).create_optimizer()
    decay, no_decay = optimizer.param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.01, 0.0)
    return [names[id(p)] for p in decay["params"]], [names[id(p)] for p in no_decay["params"]]


def optsched_groups(model: nn.Module) -> tuple[list[str], list[str]]:
    """optsched's ``create_optimizer`` groups, as names: ``(decay, no_decay)``."""
    import optsched

    names = {id(p): n for n, p in model.named_parameters()}
    args = optsched.TrainingArguments(weight_decay=0.01, optim="adamw_torch")
    decay, no_decay = [], []
    for group in optsched.create_optimizer(model, args).param_groups:
        (decay if group["weight_decay"] > 0 else no_decay).extend(names[id(p)] for p in group["params"])
    return decay, no_decay


def explain_hf(model: nn.Module, name: str) -> str:
    """The transformers rule that exempts ``name`` from decay, or ``"none (decays)"``."""
    parts = name.split(".")
    for depth in range(1, len(parts)):  # the children of the model down to the owner, not the model
        path = ".".join(parts[:depth])
        if isinstance(model.get_submodule(path), nn.LayerNorm):
            return f"inside nn.LayerNorm {path!r}"
    hits = [pattern for pattern in HF_PATTERNS if re.search(pattern, name.lower())]
    return f"name pattern {hits[0]!r}" if hits else "none (decays)"


def explain_optsched(model: nn.Module, name: str) -> str:
    """The optsched rule that decides ``name`` (``optsched.params.classify``), or ``"none (decays)"``."""
    from optsched.params import classify_parameters

    info = next(i for i in classify_parameters(model) if i.name == name)
    if getattr(info, "in_transformers_model", False):  # absent before 0.1.0 made the rule exact
        return "transformers' rule: " + ("exempt" if info.transformers_exempt else "decays")
    if info.is_norm:
        return f"robust rule: norm ({info.module_type.__name__})"
    if info.is_bias:
        return "robust rule: bias (word rule)"
    return "none (decays)"


def compare(model: nn.Module, use_trainer: bool) -> list[dict]:
    """The differences between both sides on ``model``: all trainable, then every third tensor frozen."""
    named = list(model.named_parameters())
    saved = [p.requires_grad for _, p in named]
    diffs: list[dict] = []
    try:
        decisions = {}
        for phase in ("all trainable", "every third frozen"):
            if phase == "every third frozen":
                for index, (_, p) in enumerate(named):
                    p.requires_grad_(index % 3 != 1)
            reference = hf_groups(model)
            if use_trainer and hf_trainer_groups(model) != reference:
                raise AssertionError(
                    "transformers.Trainer disagrees with the get_decay_parameter_names shortcut"
                )
            ours = optsched_groups(model)
            trainable = {n for n, p in named if p.requires_grad}
            for side, (decay, no_decay) in (("transformers", reference), ("optsched", ours)):
                if sorted(decay + no_decay) != sorted(trainable):
                    extra = sorted(set(decay + no_decay) - trainable)
                    missing = sorted(trainable - set(decay + no_decay))
                    diffs.append(_frozen_diff(phase, side, extra, missing))
            hf_decay, os_decay = set(reference[0]), set(ours[0])
            for name in sorted((hf_decay ^ os_decay) & trainable):
                if phase == "all trainable":
                    decisions[name] = name in hf_decay
                    diffs.append(_decision_diff(model, name, name in hf_decay, name in os_decay))
                elif decisions.get(name) != (name in hf_decay):
                    diffs.append(_frozen_diff(phase, "both", [], [name], "decision changed when frozen"))
    finally:
        for (_, p), flag in zip(named, saved):
            p.requires_grad_(flag)
    return diffs


def _decision_diff(model: nn.Module, name: str, hf_decays: bool, optsched_decays: bool) -> dict:
    owner = model.get_submodule(name.rpartition(".")[0])
    hf_rule, optsched_rule = explain_hf(model, name), explain_optsched(model, name)
    return {
        "name": name,
        "transformers": "decay" if hf_decays else "no_decay",
        "optsched": "decay" if optsched_decays else "no_decay",
        "module": type(owner).__name__,
        "hf_rule": hf_rule,
        "optsched_rule": optsched_rule,
        "category": category(optsched_rule),
    }


def _frozen_diff(phase: str, side: str, extra: list[str], missing: list[str], what: str = "") -> dict:
    what = what or f"{len(extra)} frozen tensors in a group, {len(missing)} trainable ones in none"
    return {"name": (extra + missing)[0], "category": "frozen", "module": "", "phase": phase,
            "transformers": "", "optsched": "", "hf_rule": f"{side}: {what}", "optsched_rule": ""}  # fmt: skip


def category(optsched_rule: str) -> str:
    """The key of :data:`CATEGORIES` that explains one decision mismatch."""
    return "other" if optsched_rule.startswith("transformers' rule") else "robust-rule"


# ----------------------------------------------------------------------------------------- report


def report(outcomes: list[Outcome], seconds: float) -> None:
    """Print the counts, the mismatches grouped by category, then the skip reasons."""
    counts = collections.Counter(o.status for o in outcomes)
    built = counts["identical"] + counts["mismatch"] + counts["error"]
    how = collections.Counter(o.how for o in outcomes if o.status != "skipped")
    checked = sum(o.trainer_checked for o in outcomes)
    print(f"\nmodel classes tried: {len(outcomes)} ({seconds:.0f} s)")
    print(f"  built       {built:5}  ({', '.join(f'{k}: {v}' for k, v in sorted(how.items()))})")
    print(f"  skipped     {counts['skipped']:5}")
    print(f"  identical   {counts['identical']:5}")
    print(f"  mismatched  {counts['mismatch']:5}")
    print(f"  errors      {counts['error']:5}")
    for outcome in outcomes:
        if outcome.status == "error":
            print(f"    {outcome.label}: {outcome.how}")
    print(f"  (of the built, {checked} were also checked against a real transformers.Trainer)")

    by_category: dict[str, dict[str, list[dict]]] = collections.defaultdict(
        lambda: collections.defaultdict(list)
    )
    for outcome in outcomes:
        for diff in outcome.diffs:
            by_category[diff["category"]][outcome.label].append(diff)
    for key, title in CATEGORIES.items():
        per_label = by_category.get(key)
        if not per_label:
            continue
        n_params = sum(map(len, per_label.values()))
        sides = collections.Counter(
            (d["transformers"], d["optsched"]) for ds in per_label.values() for d in ds
        )
        side_text = "; ".join(
            f"transformers {t or '-'} / optsched {o or '-'}: {n}" for (t, o), n in sides.items()
        )
        print(
            f"\n== {key}: {title}\n   {n_params} parameters in {len(per_label)} model classes ({side_text})"
        )
        for label, diffs in per_label.items():
            rules = sorted(
                {
                    f"transformers: {_short(d['hf_rule'])}; optsched: {_short(d['optsched_rule'])}"
                    for d in diffs
                }
            )
            modules = sorted({d["module"] for d in diffs if d["module"]})
            names = ", ".join(d["name"] for d in diffs[:3]) + (", ..." if len(diffs) > 3 else "")
            print(f"   {label}: {len(diffs)} [{', '.join(modules)}] <{'; '.join(rules)}> {names}")

    skipped = collections.Counter(
        re.sub(r"\d+", "N", o.how.split("|")[0].strip())[:110] for o in outcomes if o.status == "skipped"
    )
    if skipped:
        print("\nskip reasons (first attempt's error, most common first):")
        for reason, count in skipped.most_common(12):
            print(f"  {count:4}  {reason}")


def _short(rule: str) -> str:
    """A rule without the module path it names, so that equal rules group together."""
    return re.sub(r" (?:at )?'[^']*'$", "", rule) if " at '" in rule or rule.startswith("inside") else rule


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma-separated model_types (default: every one)")
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds per build attempt and per comparison"
    )
    parser.add_argument(
        "--trainer", choices=("none", "mismatches", "all"), default="mismatches",
        help="which CPU-built models to also check with a real transformers.Trainer (default: mismatches)",
    )  # fmt: skip
    parser.add_argument("--json", default="", help="write every outcome, with every differing name, here")
    parser.add_argument("--verbose", action="store_true", help="print each model class as it is done")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")

    only = {t.strip() for t in args.only.split(",") if t.strip()} or None
    started = time.perf_counter()
    outcomes = sweep(only, MAPPINGS, args.timeout, args.trainer, args.verbose)
    report(outcomes, time.perf_counter() - started)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([vars(o) for o in outcomes], f, indent=1)
    return 0


def run_one(model: nn.Module, outcome: Outcome, timeout: float, trainer: str) -> Outcome:
    """Compare both sides on one built model; a failure marks the outcome skipped."""
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    try:
        with time_limit(timeout):
            outcome.diffs = compare(model, use_trainer=on_cpu and trainer == "all")
            if outcome.diffs and on_cpu and trainer == "mismatches":
                outcome.diffs = compare(model, use_trainer=True)
    except Exception as error:  # noqa: BLE001 - reported, not raised: the sweep goes on
        outcome.status = "error"  # the model was built: a failure here is optsched's or transformers'
        outcome.how = f"compare: {type(error).__name__}: {error}"[:300]
        outcome.diffs = []
        return outcome
    outcome.trainer_checked = on_cpu and (trainer == "all" or bool(outcome.diffs and trainer != "none"))
    outcome.status = "mismatch" if outcome.diffs else "identical"
    outcome.n_params = sum(1 for _ in model.parameters())
    return outcome


if __name__ == "__main__":
    sys.exit(main())
