"""Tests for optsched.arguments: fields, validation, explicit-field tracking, warmup, conversion."""

from __future__ import annotations

import copy
import dataclasses
import enum
import json
import logging
import math
import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optsched.arguments import DEFAULT_OPTIM, OPTSCHED_ONLY_FIELDS, TrainingArguments, as_training_arguments
from optsched.optim import list_optimizers
from optsched.schedules import list_schedulers

# --------------------------------------------------------------------------------------------------
# Good inputs
# --------------------------------------------------------------------------------------------------


class _StrEnum(str, enum.Enum):  # the shape of transformers' OptimizerNames / SchedulerType
    SGD = "sgd"
    COSINE = "cosine"
    STEPS = "steps"


def test_defaults_match_transformers_5():
    a = TrainingArguments()
    expected = {
        "output_dir": "trainer_output", "learning_rate": 5e-5, "weight_decay": 0.0, "adam_beta1": 0.9,
        "adam_beta2": 0.999, "adam_epsilon": 1e-8, "max_grad_norm": 1.0, "num_train_epochs": 3.0,
        "max_steps": -1, "per_device_train_batch_size": 8, "per_device_eval_batch_size": 8,
        "auto_find_batch_size": False, "skip_memory_metrics": True,
        "gradient_accumulation_steps": 1, "optim": DEFAULT_OPTIM, "optim_args": None,
        "optim_target_modules": None, "lr_scheduler_type": "linear", "lr_scheduler_kwargs": {},
        "warmup_steps": 0, "warmup_ratio": 0.0, "logging_steps": 500, "logging_strategy": "steps",
        "logging_first_step": False, "logging_nan_inf_filter": True, "log_level": "passive",
        "log_level_replica": "warning", "log_on_each_node": True,
        "include_num_input_tokens_seen": "no", "eval_strategy": "no",
        "eval_steps": None, "eval_delay": 0.0, "eval_on_start": False, "save_strategy": "steps", "save_steps": 500,
        "save_total_limit": None, "save_only_model": False, "ignore_data_skip": False,
        "restore_callback_states_from_checkpoint": False, "seed": 42, "full_determinism": False, "data_seed": None,
        "bf16": False, "fp16": False, "bf16_full_eval": False, "fp16_full_eval": False, "tf32": None, "use_cpu": False,
        "dataloader_num_workers": 0, "dataloader_drop_last": False,
        "dataloader_pin_memory": True, "dataloader_persistent_workers": False, "dataloader_prefetch_factor": None,
        "dataloader_multiprocessing_context": None, "dataloader_in_order": True, "remove_unused_columns": True,
        "train_sampling_strategy": "random", "group_by_length": False, "length_column_name": "length",
        "label_names": None, "prediction_loss_only": False, "eval_accumulation_steps": None,
        "debug": [], "include_for_metrics": [], "batch_eval_metrics": False, "eval_do_concat_batches": True,
        "eval_use_gather_object": False,
        "label_smoothing_factor": 0.0, "use_cache": False, "neftune_noise_alpha": None, "activation_checkpointing": False,
        "activation_checkpointing_kwargs": None,
        "gradient_checkpointing": False, "gradient_checkpointing_kwargs": None,
        "torch_compile": False, "torch_compile_backend": None, "torch_compile_mode": None,
        "ddp_find_unused_parameters": None, "ddp_broadcast_buffers": None, "ddp_bucket_cap_mb": None,
        "average_tokens_across_devices": True, "ddp_static_graph": None, "ddp_backend": None, "ddp_timeout": 1800,
        "torch_empty_cache_steps": None, "report_to": [], "disable_tqdm": False, "load_best_model_at_end": False, "metric_for_best_model": None, "greater_is_better": None,
        "enable_jit_checkpoint": False, "run_name": None,
        # optsched's own (OPTSCHED_ONLY_FIELDS)
        "save_on_signal": True, "save_signals": "SIGTERM,SIGINT", "max_consecutive_nonfinite": 5,
        "lr_resume_policy": "replan",
        "decay_policy": "hf", "param_rules": None, "layerwise_lr_decay": None, "layer_id_fn": None,
        "checkpoint_verification": "full", "model_input_name": "input_ids",
    }
    assert a.to_dict() == expected
    assert a.explicit_fields == frozenset()


#: transformers 4's fields that 5.23 no longer has, and optsched's default for each (group_by_length: None,
#: unset, so that train_sampling_strategy alone decides; it then mirrors it)
TRANSFORMERS_4_ONLY = {"warmup_ratio": 0.0, "group_by_length": None}


def test_declared_defaults_equal_transformers_declared_defaults():
    transformers = pytest.importorskip("transformers")
    hf_fields = {f.name: f for f in dataclasses.fields(transformers.TrainingArguments)}
    for f in dataclasses.fields(TrainingArguments):
        if f.name in TRANSFORMERS_4_ONLY:
            assert f.default == TRANSFORMERS_4_ONLY[f.name], f.name
            continue
        if f.name in OPTSCHED_ONLY_FIELDS:  # optsched's own: no transformers counterpart
            assert f.name not in hf_fields and f.metadata["help"], f.name
            continue
        if f.name == "include_for_metrics":  # transformers' default_factory=list: declared None, normalised to []
            assert f.default is None and getattr(TrainingArguments(), f.name) == hf_fields[f.name].default_factory()
            continue
        assert f.default == hf_fields[f.name].default, f.name
        assert f.metadata["help"], f.name


GOOD = [
    ({}, {"optim": DEFAULT_OPTIM}),
    ({"output_dir": Path("~/runs/x")}, {"output_dir": os.path.expanduser("~/runs/x")}),
    ({"output_dir": None}, {"output_dir": "trainer_output"}),
    ({"learning_rate": 1}, {"learning_rate": 1.0}),
    ({"learning_rate": 0}, {"learning_rate": 0.0}),
    ({"num_train_epochs": 2}, {"num_train_epochs": 2.0}),
    ({"num_train_epochs": 0.5}, {"num_train_epochs": 0.5}),
    ({"max_steps": 100}, {"max_steps": 100}),
    ({"adam_beta1": 0.0, "adam_beta2": 0.0}, {"adam_beta1": 0.0, "adam_beta2": 0.0}),
    ({"warmup_steps": 10.0}, {"warmup_steps": 10}),
    ({"ddp_find_unused_parameters": False, "ddp_bucket_cap_mb": 50},
     {"ddp_find_unused_parameters": False, "ddp_bucket_cap_mb": 50}),
    ({"warmup_steps": 0.1}, {"warmup_steps": 0.1}),
    ({"warmup_steps": 0.0}, {"warmup_steps": 0}),
    ({"warmup_ratio": 0.1}, {"warmup_ratio": 0.1, "warmup_steps": 0}),
    ({"warmup_steps": 0.1, "warmup_ratio": 0.1}, {"warmup_steps": 0.1}),
    ({"lr_scheduler_type": "polynomial", "lr_scheduler_kwargs": '{"power": 2.0}'},
     {"lr_scheduler_kwargs": {"power": 2.0}}),
    ({"lr_scheduler_kwargs": ""}, {"lr_scheduler_kwargs": {}}),
    ({"lr_scheduler_type": _StrEnum.COSINE}, {"lr_scheduler_type": "cosine"}),
    ({"optim": _StrEnum.SGD}, {"optim": "sgd"}),
    ({"logging_strategy": _StrEnum.STEPS}, {"logging_strategy": "steps"}),
    ({"optim": "sgd", "optim_args": {"momentum": 0.9}}, {"optim_args": {"momentum": 0.9}}),
    ({"optim": "sgd", "optim_args": "momentum=0.9,nesterov=False"},
     {"optim_args": "momentum=0.9,nesterov=False"}),  # kept as given
    ({"optim": "sgd", "optim_args": '{"momentum": 0.9}'}, {"optim_args": '{"momentum": 0.9}'}),
    ({"optim_target_modules": ("attn", "mlp")}, {"optim_target_modules": ["attn", "mlp"]}),
    ({"optim_target_modules": r".*attn.*"}, {"optim_target_modules": r".*attn.*"}),
    ({"report_to": "wandb"}, {"report_to": ["wandb"]}),
    ({"report_to": "none"}, {"report_to": []}),
    ({"report_to": ["none"]}, {"report_to": []}),
    ({"report_to": None}, {"report_to": []}),
    ({"report_to": ["tensorboard", "wandb", "wandb"]}, {"report_to": ["tensorboard", "wandb"]}),
    ({"eval_strategy": "steps", "logging_steps": 50}, {"eval_steps": 50}),
    ({"eval_strategy": "steps", "eval_steps": 0.25}, {"eval_steps": 0.25}),
    ({"eval_strategy": "epoch"}, {"eval_steps": None}),
    ({"logging_steps": 1.0}, {"logging_steps": 1}),
    ({"logging_steps": 0.05}, {"logging_steps": 0.05}),
    ({"logging_strategy": "no", "logging_steps": 0}, {"logging_steps": 0}),
    ({"save_strategy": "best", "eval_strategy": "epoch", "metric_for_best_model": "loss"},
     {"save_strategy": "best", "greater_is_better": False}),
    ({"save_total_limit": 1}, {"save_total_limit": 1}),
    ({"lr_scheduler_type": "reduce_lr_on_plateau"},
     {"metric_for_best_model": "loss", "greater_is_better": False}),
    ({"metric_for_best_model": "accuracy"}, {"greater_is_better": True}),
    ({"load_best_model_at_end": True, "eval_strategy": "steps", "eval_steps": 5, "save_steps": 10},
     {"metric_for_best_model": "loss", "greater_is_better": False}),
    ({"load_best_model_at_end": True, "eval_strategy": "epoch", "save_strategy": "best", "metric_for_best_model": "f1"},
     {"metric_for_best_model": "f1", "greater_is_better": True}),
    ({"metric_for_best_model": "eval_loss", "greater_is_better": True}, {"greater_is_better": True}),
    ({"seed": 0, "data_seed": 2**32 - 1}, {"seed": 0, "data_seed": 2**32 - 1}),
    ({"bf16": True, "use_cpu": True}, {"bf16": True}),
    ({"logging_first_step": True}, {"logging_first_step": True}),
    ({"run_name": "exp-1"}, {"run_name": "exp-1"}),
    ({"eval_delay": 2}, {"eval_delay": 2.0}),
    ({"eval_delay": 0.5, "eval_strategy": "epoch"}, {"eval_delay": 0.5}),
    ({"disable_tqdm": True}, {"disable_tqdm": True}),
    ({"max_grad_norm": 0}, {"max_grad_norm": 0.0}),
    ({"train_sampling_strategy": "group_by_length"}, {"group_by_length": True}),
    ({"group_by_length": True}, {"train_sampling_strategy": "group_by_length"}),
    ({"group_by_length": False}, {"train_sampling_strategy": "random"}),
    ({"group_by_length": True, "train_sampling_strategy": "group_by_length"}, {"group_by_length": True}),
    ({"length_column_name": "n", "model_input_name": "input_values"},
     {"length_column_name": "n", "model_input_name": "input_values"}),
    ({"include_for_metrics": "loss"}, {"include_for_metrics": ["loss"]}),
    ({"include_for_metrics": ("inputs", "loss", "inputs")}, {"include_for_metrics": ["inputs", "loss"]}),
    ({"include_for_metrics": None}, {"include_for_metrics": []}),
    ({"eval_accumulation_steps": 4, "batch_eval_metrics": True}, {"eval_accumulation_steps": 4, "batch_eval_metrics": True}),
    ({"log_level": "detail", "log_level_replica": "passive", "log_on_each_node": False},
     {"log_level": "detail", "log_level_replica": "passive", "log_on_each_node": False}),
    ({"full_determinism": True, "tf32": False}, {"full_determinism": True, "tf32": False}),
    ({"tf32": True}, {"tf32": True}),  # not checked against the hardware here: the Trainer does
]


@pytest.mark.parametrize(("kwargs", "expected"), GOOD, ids=[str(i) for i in range(len(GOOD))])
def test_good_inputs(kwargs, expected):
    a = TrainingArguments(**kwargs)
    for name, value in expected.items():
        got = getattr(a, name)
        assert got == value and type(got) is type(value), (name, got, value)
    json.dumps(a.to_dict())  # always serialisable


@pytest.mark.parametrize("name", list_optimizers())
def test_every_registered_optimizer_name_is_accepted(name):
    a = TrainingArguments(optim=name)
    assert a.optim == name and a.is_explicit("optim")


# schedules that cannot run without some kwargs (as in transformers' get_scheduler)
_REQUIRED_KWARGS = {
    "cosine_with_min_lr": {"min_lr_rate": 0.1},
    "cosine_warmup_with_min_lr": {"min_lr_rate": 0.1},
    "warmup_stable_decay": {"num_decay_steps": 10},
}


@pytest.mark.parametrize("name", list_schedulers())
def test_every_registered_schedule_name_is_accepted(name):
    a = TrainingArguments(lr_scheduler_type=name, lr_scheduler_kwargs=_REQUIRED_KWARGS.get(name))
    assert a.lr_scheduler_type == name
    assert (a.metric_for_best_model == "loss") == (name in {"reduce_lr_on_plateau", "greedy"})


@pytest.mark.parametrize(("alias", "canonical"), [
    ("COSINE", "cosine"), ("wsd", "warmup_stable_decay"), ("plateau", "reduce_lr_on_plateau"),
    ("cosine_with_hard_restarts", "cosine_with_restarts"),
])
def test_schedule_aliases_become_canonical_names(alias, canonical):
    kwargs = _REQUIRED_KWARGS.get(canonical)
    assert TrainingArguments(lr_scheduler_type=alias, lr_scheduler_kwargs=kwargs).lr_scheduler_type == canonical


def test_schedule_kwargs_a_schedule_requires_are_checked_early():
    with pytest.raises(ValueError, match="num_decay_steps"):
        TrainingArguments(lr_scheduler_type="warmup_stable_decay")


def test_import_and_use_never_imports_transformers():
    code = (
        "import sys; from optsched.arguments import TrainingArguments, as_training_arguments; "
        "import types; a = as_training_arguments(types.SimpleNamespace(learning_rate=1e-3)); "
        "TrainingArguments(optim='sgd', lr_scheduler_type='cosine').to_json_string(); "
        "assert 'transformers' not in sys.modules, 'transformers imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)


def test_numpy_scalars_become_python_numbers():
    np = pytest.importorskip("numpy")
    a = TrainingArguments(learning_rate=np.float64(1e-3), per_device_train_batch_size=np.int64(4),
                          warmup_steps=np.int64(3))
    assert type(a.learning_rate) is float and type(a.per_device_train_batch_size) is int
    assert type(a.warmup_steps) is int
    json.dumps(a.to_dict())


def test_transformers_enums_become_plain_strings():
    transformers = pytest.importorskip("transformers")
    from transformers.trainer_utils import IntervalStrategy, SaveStrategy, SchedulerType

    a = TrainingArguments(optim=transformers.training_args.OptimizerNames.SGD,
                          lr_scheduler_type=SchedulerType.COSINE, eval_strategy=IntervalStrategy.EPOCH,
                          save_strategy=SaveStrategy.BEST, metric_for_best_model="loss")
    for name, value in [("optim", "sgd"), ("lr_scheduler_type", "cosine"), ("eval_strategy", "epoch"),
                        ("save_strategy", "best")]:
        assert getattr(a, name) == value and type(getattr(a, name)) is str


# --------------------------------------------------------------------------------------------------
# Bad inputs: every one names the field and the value
# --------------------------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")
BAD = [
    # (kwargs, exception, fragments the message must contain)
    ({"learning_rate": -1e-3}, ValueError, ["learning_rate", "-0.001"]),
    ({"ddp_find_unused_parameters": "yes"}, TypeError, ["ddp_find_unused_parameters", "'yes'"]),
    ({"ddp_bucket_cap_mb": 0}, ValueError, ["ddp_bucket_cap_mb", "0"]),
    ({"learning_rate": NAN}, ValueError, ["learning_rate", "nan"]),
    ({"learning_rate": INF}, ValueError, ["learning_rate", "inf"]),
    ({"learning_rate": "1e-3"}, TypeError, ["learning_rate", "'1e-3'"]),
    ({"learning_rate": True}, TypeError, ["learning_rate", "True"]),
    ({"weight_decay": -0.1}, ValueError, ["weight_decay", "-0.1"]),
    ({"adam_beta1": 1.0}, ValueError, ["adam_beta1", "1.0", "[0, 1)"]),
    ({"save_strategy": "best", "eval_strategy": "epoch"}, ValueError, ["save_strategy", "metric_for_best_model"]),
    ({"save_strategy": "best", "metric_for_best_model": "loss"}, ValueError, ["save_strategy", "eval_strategy='no'"]),
    ({"adam_beta1": -0.1}, ValueError, ["adam_beta1", "-0.1"]),
    ({"adam_beta2": 1.5}, ValueError, ["adam_beta2", "1.5"]),
    ({"adam_beta2": None}, TypeError, ["adam_beta2", "None"]),
    ({"adam_epsilon": 0.0}, ValueError, ["adam_epsilon", "0.0", "(0"]),
    ({"adam_epsilon": -1e-8}, ValueError, ["adam_epsilon", "-1e-08"]),
    ({"max_grad_norm": -1.0}, ValueError, ["max_grad_norm", "-1.0"]),
    ({"num_train_epochs": 0}, ValueError, ["num_train_epochs", "0"]),
    ({"num_train_epochs": INF}, ValueError, ["num_train_epochs", "inf"]),
    ({"max_steps": 0}, ValueError, ["max_steps", "0", "-1"]),
    ({"max_steps": -2}, ValueError, ["max_steps", "-2"]),
    ({"max_steps": 10.0}, TypeError, ["max_steps", "10.0"]),
    ({"per_device_train_batch_size": 0}, ValueError, ["per_device_train_batch_size", "0"]),
    ({"per_device_eval_batch_size": -1}, ValueError, ["per_device_eval_batch_size", "-1"]),
    ({"gradient_accumulation_steps": 0}, ValueError, ["gradient_accumulation_steps", "0"]),
    ({"gradient_accumulation_steps": 2.0}, TypeError, ["gradient_accumulation_steps", "2.0"]),
    ({"optim": "adamw_troch"}, ValueError, ["optim", "'adamw_troch'", "Did you mean", "'adamw_torch"]),
    ({"optim": 3}, TypeError, ["optim", "3"]),
    ({"lr_scheduler_type": "cosin"}, ValueError, ["lr_scheduler_type", "'cosin'", "'cosine'"]),
    ({"lr_scheduler_type": None}, TypeError, ["lr_scheduler_type", "None"]),
    ({"lr_scheduler_kwargs": "{bad json"}, ValueError, ["lr_scheduler_kwargs", "'{bad json'"]),
    ({"lr_scheduler_kwargs": "[1, 2]"}, ValueError, ["lr_scheduler_kwargs", "'[1, 2]'"]),
    ({"lr_scheduler_kwargs": [1, 2]}, TypeError, ["lr_scheduler_kwargs", "[1, 2]"]),
    ({"lr_scheduler_type": "polynomial", "lr_scheduler_kwargs": {"powr": 2.0}}, ValueError,
     ["lr_scheduler_kwargs", "powr"]),
    ({"lr_scheduler_type": "cosine", "lr_scheduler_kwargs": {"num_cycles": -1}}, ValueError,
     ["num_cycles", "-1"]),
    ({"warmup_steps": -1}, ValueError, ["warmup_steps", "-1"]),
    ({"warmup_steps": 2.5}, ValueError, ["warmup_steps", "2.5", "(0, 1)"]),
    ({"warmup_steps": "10"}, TypeError, ["warmup_steps", "'10'"]),
    ({"warmup_steps": NAN}, ValueError, ["warmup_steps", "nan"]),
    ({"warmup_ratio": 1.01}, ValueError, ["warmup_ratio", "1.01"]),
    ({"warmup_ratio": -0.1}, ValueError, ["warmup_ratio", "-0.1"]),
    ({"warmup_steps": 10, "warmup_ratio": 0.1}, ValueError, ["warmup_steps=10", "warmup_ratio=0.1"]),
    ({"warmup_steps": 0.2, "warmup_ratio": 0.1}, ValueError, ["warmup_steps=0.2", "warmup_ratio=0.1"]),
    ({"warmup_steps": 1, "warmup_ratio": 1.0}, ValueError, ["warmup_steps=1", "warmup_ratio=1.0"]),
    ({"logging_steps": -5}, ValueError, ["logging_steps", "-5"]),
    ({"logging_steps": 12.5}, ValueError, ["logging_steps", "12.5"]),
    ({"logging_steps": 0}, ValueError, ["logging_steps=0", "logging_strategy='steps'"]),
    ({"logging_strategy": "step"}, ValueError, ["logging_strategy", "'step'", "Did you mean 'steps'"]),
    ({"eval_strategy": "always"}, ValueError, ["eval_strategy", "'always'", "epoch, no, steps"]),
    ({"save_strategy": "bestt"}, ValueError, ["save_strategy", "'bestt'", "'best'"]),
    ({"save_strategy": 1}, TypeError, ["save_strategy", "1"]),
    ({"save_steps": 0}, ValueError, ["save_steps=0", "save_strategy='steps'"]),
    ({"eval_strategy": "steps", "logging_strategy": "no", "logging_steps": 0}, ValueError,
     ["eval_steps=None", "logging_steps=0"]),
    ({"eval_steps": -1}, ValueError, ["eval_steps", "-1"]),
    ({"eval_delay": -1}, ValueError, ["eval_delay=-1", "[0, inf)"]),
    ({"eval_delay": float("inf")}, ValueError, ["eval_delay=inf", "finite"]),
    ({"eval_delay": "5"}, TypeError, ["eval_delay", "'5'"]),
    ({"logging_first_step": 1}, TypeError, ["logging_first_step", "1"]),
    ({"run_name": ""}, ValueError, ["run_name=''", "non-empty string or None"]),
    ({"run_name": 1}, TypeError, ["run_name", "string or None"]),
    ({"save_total_limit": 0}, ValueError, ["save_total_limit", "0"]),
    ({"seed": -1}, ValueError, ["seed", "-1"]),
    ({"seed": 2**32}, ValueError, ["seed", str(2**32)]),
    ({"seed": 1.5}, TypeError, ["seed", "1.5"]),
    ({"data_seed": "1"}, TypeError, ["data_seed", "'1'"]),
    ({"bf16": "yes"}, TypeError, ["bf16", "'yes'"]),
    ({"fp16": 1}, TypeError, ["fp16", "1"]),
    ({"fp16": True, "bf16": True}, ValueError, ["fp16=True", "bf16=True"]),
    ({"fp16_full_eval": True, "bf16_full_eval": True}, ValueError, ["fp16_full_eval=True", "bf16_full_eval=True"]),
    ({"use_cpu": None}, TypeError, ["use_cpu", "None"]),
    ({"dataloader_num_workers": -1}, ValueError, ["dataloader_num_workers", "-1"]),
    ({"dataloader_drop_last": "no"}, TypeError, ["dataloader_drop_last", "'no'"]),
    ({"save_only_model": 0}, TypeError, ["save_only_model", "0"]),
    ({"report_to": 5}, TypeError, ["report_to", "5"]),
    ({"report_to": ["wandb", 3]}, TypeError, ["report_to", "3"]),
    ({"optim_target_modules": [1]}, TypeError, ["optim_target_modules", "1"]),
    ({"optim_target_modules": 7}, TypeError, ["optim_target_modules", "7"]),
    ({"optim_args": 5}, TypeError, ["optim_args", "5"]),
    ({"optim": "sgd", "optim_args": "momentun=0.9"}, ValueError, ["optim_args", "'momentun'", "momentum"]),
    ({"output_dir": 5}, TypeError, ["output_dir", "5"]),
    ({"output_dir": ""}, ValueError, ["output_dir", "''"]),
    ({"metric_for_best_model": 3}, TypeError, ["metric_for_best_model", "3"]),
    ({"metric_for_best_model": " "}, ValueError, ["metric_for_best_model", "' '"]),
    ({"greater_is_better": "yes"}, TypeError, ["greater_is_better", "'yes'"]),
    ({"disable_tqdm": 1}, TypeError, ["disable_tqdm", "1"]),
    ({"learning_rat": 1e-3}, TypeError, ["learning_rat", "Did you mean 'learning_rate'"]),
    ({"warmup_step": 10}, TypeError, ["warmup_step", "'warmup_steps'"]),
    ({"checkpoint_verification": "sha256"}, ValueError, ["checkpoint_verification", "'sha256'", "full", "size"]),
    ({"lr_resume_policy": "contnue"}, ValueError, ["lr_resume_policy", "Did you mean 'continue'"]),
    ({"train_sampling_strategy": "sequential"}, ValueError,
     ["train_sampling_strategy='sequential'", "does not implement", "'random', 'group_by_length'"]),
    ({"train_sampling_strategy": "group_by_lenght"}, ValueError, ["train_sampling_strategy", "'group_by_length'"]),
    ({"group_by_length": True, "train_sampling_strategy": "random"}, ValueError,
     ["group_by_length=True and train_sampling_strategy='random' conflict", "transformers 4's name"]),
    ({"group_by_length": "yes"}, TypeError, ["group_by_length", "'yes'"]),
    ({"length_column_name": ""}, ValueError, ["length_column_name=''"]),
    ({"model_input_name": None}, TypeError, ["model_input_name", "None"]),
    ({"include_for_metrics": ["losses"]}, ValueError, ["include_for_metrics", "'losses'", "Did you mean 'loss'", "inputs"]),
    ({"include_for_metrics": 1}, TypeError, ["include_for_metrics", "int 1", "inputs, loss"]),
    ({"include_for_metrics": [None]}, TypeError, ["include_for_metrics", "None"]),
    ({"eval_accumulation_steps": 0}, ValueError, ["eval_accumulation_steps", "0"]),
    ({"eval_accumulation_steps": 2.5}, TypeError, ["eval_accumulation_steps", "2.5"]),
    ({"batch_eval_metrics": "yes"}, TypeError, ["batch_eval_metrics", "'yes'"]),
    ({"log_level": "verbose"}, ValueError, ["log_level='verbose'", "info, passive, warning"]),
    ({"log_level_replica": "warn"}, ValueError, ["log_level_replica", "'warn'", "Did you mean 'warning'"]),
    ({"log_level": 20}, TypeError, ["log_level", "20"]),
    ({"log_on_each_node": None}, TypeError, ["log_on_each_node", "None"]),
    ({"full_determinism": "yes"}, TypeError, ["full_determinism", "'yes'"]),
    ({"tf32": 1}, TypeError, ["tf32", "1"]),
    # transformers 4's deprecated spelling, gone in transformers 5 (which refuses it too)
    ({"include_inputs_for_metrics": True}, TypeError, ["include_inputs_for_metrics", "Did you mean 'include_for_metrics'"]),
]


#: load_best_model_at_end=True with these fields: accepted (None) or refused with these words, as transformers
LOAD_BEST = [
    (dict(eval_strategy="steps", eval_steps=2, save_steps=4), None),
    (dict(eval_strategy="steps", logging_steps=5, save_steps=10), None),  # eval_steps from logging_steps
    (dict(eval_strategy="steps", eval_steps=2, save_steps=3), ["save_steps=3", "eval_steps=2", "round multiple"]),
    (dict(eval_strategy="steps", eval_steps=0.1, save_steps=0.5), None),  # 0.5 % 0.1 != 0 in floating point
    (dict(eval_strategy="steps", eval_steps=0.2, save_steps=0.5), ["save_steps=0.5", "eval_steps=0.2", "multiple"]),
    (dict(eval_strategy="steps", eval_steps=0.25, save_steps=5), None),  # 5 % 0.25 == 0: accepted by both
    (dict(eval_strategy="steps", eval_steps=0.3, save_steps=5), ["save_steps=5", "eval_steps=0.3", "ratio"]),
    (dict(eval_strategy="steps", eval_steps=3, save_strategy="epoch"), ["save_strategy='epoch'", "match"]),
    (dict(), ["save_strategy='steps'", "eval_strategy='no'", "match"]),
    (dict(eval_strategy="epoch", save_strategy="epoch"), None),
    (dict(save_strategy="no"), None),
    (dict(eval_strategy="steps", eval_steps=3, save_strategy="best"), None),
]


@pytest.mark.parametrize(("kwargs", "refused"), LOAD_BEST, ids=[str(i) for i in range(len(LOAD_BEST))])
def test_load_best_model_at_end_is_checked_as_transformers_checks_it(tmp_path, kwargs, refused):
    transformers = pytest.importorskip("transformers")
    try:
        transformers.TrainingArguments(output_dir=str(tmp_path), load_best_model_at_end=True, **kwargs)
    except ValueError:
        assert refused is not None, "transformers refuses it"
    else:
        assert refused is None, "transformers accepts it"
    if refused is None:
        assert TrainingArguments(load_best_model_at_end=True, **kwargs).metric_for_best_model == "loss"
        return
    with pytest.raises(ValueError) as info:
        TrainingArguments(load_best_model_at_end=True, **kwargs)
    for fragment in ["load_best_model_at_end=True", *refused]:
        assert fragment in str(info.value)


@pytest.mark.parametrize(("kwargs", "exc", "fragments"), BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_inputs(kwargs, exc, fragments):
    with pytest.raises(exc) as info:
        TrainingArguments(**kwargs)
    assert type(info.value) is exc
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_bad_assignment_is_checked():
    a = TrainingArguments()
    with pytest.raises(ValueError, match="learning_rate=-1"):
        a.learning_rate = -1
    assert a.learning_rate == 5e-5
    a.warmup_steps = 10.0
    assert a.warmup_steps == 10 and type(a.warmup_steps) is int


def test_too_many_positional_arguments():
    with pytest.raises(TypeError):
        TrainingArguments(*range(100))


# --------------------------------------------------------------------------------------------------
# Warmup
# --------------------------------------------------------------------------------------------------

WARMUPS = [0, 1, 3, 10, 250, 0.01, 0.07, 0.1, 0.25, 0.28, 0.3, 0.5, 0.999]
TOTALS = [0, 1, 7, 10, 100, 1001, 12345]


@pytest.mark.parametrize(("warmup", "total", "expected"), [
    (0, 100, 0), (10, 100, 10), (10, 5, 10), (0.1, 100, 10), (0.1, 95, 10), (0.3, 10, 3),
    (0.07, 100, 8), (0.28, 100, 29),  # ceil of 7.000000000000001 and 28.000000000000004, as transformers
    (0.5, 1, 1), (0.999, 0, 0), (1, 0, 1),
])
def test_get_warmup_steps_reference_values(warmup, total, expected):
    assert TrainingArguments(warmup_steps=warmup).get_warmup_steps(total) == expected
    if isinstance(warmup, float):
        assert TrainingArguments(warmup_ratio=warmup).get_warmup_steps(total) == expected


@pytest.mark.parametrize("total", [0, 1, 7, 100])
def test_warmup_ratio_one_is_the_whole_run_as_in_transformers_4(total):
    # transformers 4 accepts warmup_ratio in [0, 1] and computes ceil(T * ratio): all T steps, not 1.
    assert TrainingArguments(warmup_ratio=1.0).get_warmup_steps(total) == total


def test_get_warmup_steps_matches_transformers_over_a_grid(tmp_path):
    transformers = pytest.importorskip("transformers")
    for w in WARMUPS:
        hf = transformers.TrainingArguments(output_dir=str(tmp_path), warmup_steps=w)
        ours = TrainingArguments(warmup_steps=w)
        converted = as_training_arguments(hf)
        ratio = TrainingArguments(warmup_ratio=w) if isinstance(w, float) else None
        for total in TOTALS:
            expected = hf.get_warmup_steps(total)
            assert ours.get_warmup_steps(total) == expected, (w, total)
            assert converted.get_warmup_steps(total) == expected, (w, total)
            if ratio is not None:
                assert ratio.get_warmup_steps(total) == expected, (w, total)


@pytest.mark.parametrize(("total", "exc"), [(-1, ValueError), (1.5, TypeError), ("10", TypeError)])
def test_get_warmup_steps_bad_total(total, exc):
    with pytest.raises(exc, match="num_training_steps"):
        TrainingArguments(warmup_steps=0.1).get_warmup_steps(total)


@settings(max_examples=200, deadline=None)
@given(w=st.floats(min_value=0, max_value=1, exclude_max=True), total=st.integers(0, 10**6))
def test_warmup_ratio_properties(w, total):
    steps = TrainingArguments(warmup_steps=w).get_warmup_steps(total)
    assert steps == math.ceil(total * w)
    assert 0 <= steps <= total
    assert (steps > 0) == (w > 0 and total > 0)


# --------------------------------------------------------------------------------------------------
# Explicit fields
# --------------------------------------------------------------------------------------------------


def test_explicit_fields_are_the_passed_ones_even_when_equal_to_the_default():
    a = TrainingArguments(optim="sgd", learning_rate=1e-3, adam_beta1=0.9)
    assert a.explicit_fields == {"optim", "learning_rate", "adam_beta1"}
    assert a.is_explicit("adam_beta1") and not a.is_explicit("adam_beta2")
    assert not TrainingArguments().is_explicit("optim")
    assert TrainingArguments("out").explicit_fields == {"output_dir"}


def test_is_explicit_unknown_name():
    with pytest.raises(ValueError, match="Did you mean 'learning_rate'"):
        TrainingArguments().is_explicit("learnin_rate")


def test_replace_keeps_explicit_fields_and_adds_the_changed_ones():
    a = TrainingArguments(optim="sgd", adam_beta1=0.9)
    b = dataclasses.replace(a, learning_rate=1e-3)
    assert b.learning_rate == 1e-3 and b.optim == "sgd"
    assert b.explicit_fields == {"optim", "adam_beta1", "learning_rate"}
    assert dataclasses.replace(a).explicit_fields == a.explicit_fields
    assert not dataclasses.replace(TrainingArguments(), seed=1).is_explicit("optim")


@pytest.mark.skipif(not hasattr(__import__("copy"), "replace"), reason="copy.replace: Python >= 3.13")
def test_copy_replace_tracks_explicit_fields_like_dataclasses_replace():
    import copy

    a = TrainingArguments(optim="sgd", adam_beta1=0.9)
    b = copy.replace(a, learning_rate=1e-3)
    assert b.explicit_fields == {"optim", "adam_beta1", "learning_rate"}


def test_replace_is_validated():
    with pytest.raises(ValueError, match="adam_beta1=1.0"):
        dataclasses.replace(TrainingArguments(), adam_beta1=1.0)
    with pytest.raises(ValueError, match="warmup_ratio=0.1"):
        dataclasses.replace(TrainingArguments(warmup_steps=10), warmup_ratio=0.1)


def test_replace_derives_derived_fields_again():
    a = TrainingArguments(eval_strategy="steps", logging_steps=50)
    assert a.eval_steps == 50 and not a.is_explicit("eval_steps")
    assert dataclasses.replace(a, logging_steps=20).eval_steps == 20  # transformers would keep 50
    b = TrainingArguments(eval_strategy="steps", logging_steps=50, eval_steps=30)
    assert dataclasses.replace(b, logging_steps=20).eval_steps == 30
    c = TrainingArguments(lr_scheduler_type="reduce_lr_on_plateau")
    d = dataclasses.replace(c, metric_for_best_model="accuracy")
    assert d.greater_is_better is True


def test_assignment_marks_the_field_explicit():
    a = TrainingArguments()
    a.optim = "sgd"
    assert a.optim == "sgd" and a.is_explicit("optim")
    a.non_field_attribute = 1  # other attributes are untouched by tracking
    assert a.explicit_fields == {"optim"}


@pytest.mark.parametrize("clone", [
    copy.copy, copy.deepcopy, lambda a: pickle.loads(pickle.dumps(a)),
], ids=["copy", "deepcopy", "pickle"])
def test_copies_keep_values_and_explicit_fields(clone):
    a = TrainingArguments(optim="sgd", adam_beta1=0.9, lr_scheduler_kwargs={"power": 2.0},
                          lr_scheduler_type="polynomial")
    b = clone(a)
    assert b == a and b.explicit_fields == a.explicit_fields
    b.learning_rate = 1.0  # still tracked and checked after a copy
    assert b.is_explicit("learning_rate")
    with pytest.raises(ValueError):
        b.adam_beta2 = 2.0


def test_equality_compares_values_not_explicitness():
    assert TrainingArguments(adam_beta1=0.9) == TrainingArguments()
    assert TrainingArguments(learning_rate=1e-3) != TrainingArguments()


# --------------------------------------------------------------------------------------------------
# Serialisation and repr
# --------------------------------------------------------------------------------------------------

_RICH = dict(output_dir="runs/a", optim="sgd", adam_beta1=0.9, learning_rate=1e-3, warmup_steps=0.1,
             lr_scheduler_type="polynomial", lr_scheduler_kwargs={"power": 2.0}, eval_strategy="steps",
             logging_steps=10, report_to=["tensorboard"], optim_target_modules=["attn"], seed=3)


def test_to_dict_from_dict_round_trip():
    a = TrainingArguments(**_RICH)
    d = a.to_dict()
    assert json.loads(a.to_json_string()) == d
    b = TrainingArguments.from_dict(d)
    assert b == a
    # without the stored explicit fields, the fields that differ from the default count as explicit
    assert b.explicit_fields == set(_RICH) - {"adam_beta1"}
    c = TrainingArguments.from_dict(json.loads(a.to_json_string(include_explicit_fields=True)))
    assert c == a and c.explicit_fields == a.explicit_fields


def test_to_dict_is_a_copy():
    a = TrainingArguments(**_RICH)
    a.to_dict()["lr_scheduler_kwargs"]["power"] = 3.0
    assert a.lr_scheduler_kwargs == {"power": 2.0}


def test_from_dict_unknown_keys():
    d = {**TrainingArguments().to_dict(), "hub_token": "x"}
    with pytest.raises(TypeError, match="hub_token"):
        TrainingArguments.from_dict(d)
    assert TrainingArguments.from_dict(d, ignore_unknown=True) == TrainingArguments()
    with pytest.raises(TypeError, match="mapping"):
        TrainingArguments.from_dict([("learning_rate", 1.0)])
    with pytest.raises(ValueError, match="explicit_fields"):
        TrainingArguments.from_dict({"_explicit_fields": ["nope"]})
    with pytest.raises(ValueError, match="explicit_fields"):
        TrainingArguments.from_dict({}, explicit_fields="optim")


def test_from_dict_with_the_explicit_fields_a_cli_knows():
    # a CLI parser fills every field; it knows which flags were given
    parsed = {**TrainingArguments().to_dict(), "optim": "sgd", "adam_beta1": 0.9}
    a = TrainingArguments.from_dict(parsed, explicit_fields=["optim", "adam_beta1"])
    assert a.optim == "sgd" and a.explicit_fields == {"optim", "adam_beta1"}
    assert TrainingArguments.from_dict(parsed).explicit_fields == {"optim"}  # inferred: 0.9 is the default


def test_repr_is_short_and_evaluates_back():
    assert repr(TrainingArguments()) == "TrainingArguments()"
    assert repr(TrainingArguments(learning_rate=1e-3)) == "TrainingArguments(learning_rate=0.001)"
    a = TrainingArguments(**_RICH)
    assert eval(repr(a), {"TrainingArguments": TrainingArguments}) == a


# --------------------------------------------------------------------------------------------------
# as_training_arguments
# --------------------------------------------------------------------------------------------------


def test_as_training_arguments_own_none_and_mapping():
    a = TrainingArguments(learning_rate=1e-3)
    assert as_training_arguments(a) is a
    assert as_training_arguments(None) == TrainingArguments()
    m = as_training_arguments({"learning_rate": 1e-3, "optim": "sgd"})
    assert m.learning_rate == 1e-3 and m.explicit_fields == {"learning_rate", "optim"}
    with pytest.raises(TypeError, match="learning_rat"):
        as_training_arguments({"learning_rat": 1e-3})


@pytest.mark.parametrize("bad", [5, 1.5, "args", b"x", object(), [("learning_rate", 1.0)], {1: 2}])
def test_as_training_arguments_refuses_non_arguments(bad):
    name = type(next(iter(bad))).__name__ if isinstance(bad, dict) else type(bad).__name__
    with pytest.raises(TypeError, match=name):
        as_training_arguments(bad)


def test_as_training_arguments_from_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    given_kwargs = dict(
        learning_rate=3e-4, weight_decay=0.01, optim="sgd", adam_beta1=0.8, lr_scheduler_type="cosine",
        lr_scheduler_kwargs={"num_cycles": 0.5}, warmup_steps=0.1, eval_strategy="steps", logging_steps=20,
        save_total_limit=2, seed=7, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        report_to="none", max_steps=100, logging_first_step=True, eval_delay=30, run_name="exp-1",
        train_sampling_strategy="group_by_length", length_column_name="n_tokens",
    )
    hf = transformers.TrainingArguments(output_dir=str(tmp_path), **given_kwargs)
    ours = as_training_arguments(hf)
    for f in dataclasses.fields(TrainingArguments):
        if f.name in TRANSFORMERS_4_ONLY or f.name in OPTSCHED_ONLY_FIELDS:
            continue
        theirs = getattr(hf, f.name)
        theirs = getattr(theirs, "value", theirs)
        if f.name == "lr_scheduler_kwargs":
            theirs = theirs or {}
        assert getattr(ours, f.name) == theirs, f.name
    assert ours.output_dir == str(tmp_path)
    assert ours.eval_steps == 20  # derived from logging_steps, as in transformers: not explicit
    # report_to="none" is the default; the rest differ from optsched's defaults
    assert ours.explicit_fields == (set(given_kwargs) - {"report_to"}) | {"output_dir"}
    assert ours.get_warmup_steps(100) == hf.get_warmup_steps(100) == 10


def test_as_training_arguments_from_transformers_defaults(tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = as_training_arguments(transformers.TrainingArguments(output_dir=str(tmp_path)))
    assert ours == TrainingArguments(output_dir=str(tmp_path))
    assert ours.explicit_fields == {"output_dir"}
    assert not ours.is_explicit("optim") and not ours.is_explicit("adam_beta1")


def test_transformers_fields_optsched_does_not_use_are_named_when_set(tmp_path, caplog):
    transformers = pytest.importorskip("transformers")
    with caplog.at_level(logging.WARNING, logger="optsched.arguments"):
        as_training_arguments(transformers.TrainingArguments(output_dir=str(tmp_path), eval_strategy="epoch"))
    assert "ignored" not in caplog.text  # defaults, and fields derived from those the user set
    hf = transformers.TrainingArguments(output_dir=str(tmp_path), save_on_each_node=True, eval_strategy="epoch",
                                        save_strategy="epoch", load_best_model_at_end=True)
    with caplog.at_level(logging.WARNING, logger="optsched.arguments"):
        ours = as_training_arguments(hf)
    assert "fields that optsched does not use are set and ignored: " in caplog.text
    assert "save_on_each_node=True" in caplog.text and "load_best_model_at_end" not in caplog.text
    assert ours.load_best_model_at_end and ours.metric_for_best_model == "loss"  # read, not ignored
    assert "eval_strategy" not in caplog.text
    # the evaluation fields optsched reads are taken over, not named as ignored
    caplog.clear()
    hf = transformers.TrainingArguments(output_dir=str(tmp_path), include_for_metrics=["inputs", "loss"],
                                        batch_eval_metrics=True, eval_accumulation_steps=3)
    with caplog.at_level(logging.WARNING, logger="optsched.arguments"):
        ours = as_training_arguments(hf)
    assert "ignored" not in caplog.text
    assert (ours.include_for_metrics, ours.batch_eval_metrics, ours.eval_accumulation_steps) == (["inputs", "loss"], True, 3)
    # so are the logging and reproducibility fields (tf32=False: transformers leaves a CPU as it is)
    caplog.clear()
    hf = transformers.TrainingArguments(output_dir=str(tmp_path), log_level="info", log_level_replica="error",
                                        log_on_each_node=False, full_determinism=True, tf32=False)
    with caplog.at_level(logging.WARNING, logger="optsched.arguments"):
        ours = as_training_arguments(hf)
    assert "ignored" not in caplog.text
    assert (ours.log_level, ours.log_level_replica, ours.log_on_each_node, ours.full_determinism, ours.tf32) == (
        "info", "error", False, True, False)
    # so are the resume and evaluation options
    caplog.clear()
    taken = dict(ignore_data_skip=True, restore_callback_states_from_checkpoint=True, eval_do_concat_batches=False,
                 bf16_full_eval=True)
    hf = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, **taken)
    with caplog.at_level(logging.WARNING, logger="optsched.arguments"):
        ours = as_training_arguments(hf)
    assert "ignored" not in caplog.text
    assert {name: getattr(ours, name) for name in taken} == taken


def test_as_training_arguments_truncates_float_step_counts_like_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.TrainingArguments(output_dir=str(tmp_path), warmup_steps=2.5)
    ours = as_training_arguments(hf)
    assert ours.warmup_steps == 2 and ours.get_warmup_steps(50) == hf.get_warmup_steps(50)


@pytest.mark.parametrize(("steps", "ratio", "expected_steps", "expected_ratio", "warmup_at_100"), [
    (0, 0.1, 0, 0.1, 10),   # transformers 4: the ratio is used
    (5, 0.1, 5, 0.0, 5),    # transformers 4: warmup_steps > 0 overrides the ratio
    (0, 0.0, 0, 0.0, 0),
])
def test_as_training_arguments_from_transformers_4(steps, ratio, expected_steps, expected_ratio,
                                                   warmup_at_100):
    hf4 = types.SimpleNamespace(learning_rate=1e-3, warmup_steps=steps, warmup_ratio=ratio,
                                lr_scheduler_type="linear", optim="adafactor", optim_args="")
    ours = as_training_arguments(hf4)
    assert (ours.warmup_steps, ours.warmup_ratio) == (expected_steps, expected_ratio)
    assert ours.get_warmup_steps(100) == warmup_at_100
    assert ours.optim == "adafactor" and ours.optim_args is None and ours.is_explicit("optim")


def test_group_by_length_stands_for_the_strategy_until_the_strategy_is_set():
    args = TrainingArguments(group_by_length=True)
    assert args.train_sampling_strategy == "group_by_length" and not args.is_explicit("train_sampling_strategy")
    assert dataclasses.replace(args, group_by_length=False).train_sampling_strategy == "random"
    # the strategy set alone: the flag follows it, whatever it mirrored before
    replaced = dataclasses.replace(TrainingArguments(), train_sampling_strategy="group_by_length")
    assert replaced.group_by_length is True and not replaced.is_explicit("group_by_length")
    assert dataclasses.replace(replaced, train_sampling_strategy="random").group_by_length is False
    assert TrainingArguments.from_dict(args.to_dict()) == args
    # transformers 4's arguments carry the flag, not the strategy
    hf4 = as_training_arguments(types.SimpleNamespace(learning_rate=1e-3, group_by_length=True,
                                                      length_column_name="lengths"))
    assert (hf4.train_sampling_strategy, hf4.length_column_name) == ("group_by_length", "lengths")


def test_as_training_arguments_reports_bad_foreign_values():
    with pytest.raises(ValueError, match="learning_rate=-1"):
        as_training_arguments(types.SimpleNamespace(learning_rate=-1.0))


# --------------------------------------------------------------------------------------------------
# Property tests
# --------------------------------------------------------------------------------------------------

_unit_open = st.floats(min_value=0, max_value=1, exclude_max=True)
_ratio = st.floats(min_value=0, max_value=1, exclude_min=True, exclude_max=True)
_interval = st.one_of(st.integers(1, 10_000), _ratio)
VALID = st.fixed_dictionaries({}, optional={
    "learning_rate": st.floats(0, 10), "weight_decay": st.floats(0, 1), "adam_beta1": _unit_open,
    "adam_beta2": _unit_open, "adam_epsilon": st.floats(1e-12, 1), "max_grad_norm": st.floats(0, 100),
    "num_train_epochs": st.floats(1e-3, 100), "max_steps": st.one_of(st.just(-1), st.integers(1, 10**6)),
    "per_device_train_batch_size": st.integers(1, 512), "gradient_accumulation_steps": st.integers(1, 64),
    "optim": st.sampled_from(["adamw_torch", "adamw_torch_fused", "sgd", "adafactor"]),
    "lr_scheduler_type": st.sampled_from(["linear", "cosine", "constant", "constant_with_warmup"]),
    "warmup_steps": st.one_of(st.integers(0, 10_000), _ratio),
    "logging_steps": _interval, "save_steps": _interval, "eval_steps": st.one_of(st.none(), _interval),
    "logging_strategy": st.sampled_from(["no", "steps", "epoch"]),
    "eval_strategy": st.sampled_from(["no", "steps", "epoch"]),
    "save_strategy": st.sampled_from(["no", "steps", "epoch", "best"]),
    "save_total_limit": st.one_of(st.none(), st.integers(1, 10)), "seed": st.integers(0, 2**32 - 1),
    "bf16": st.booleans(), "report_to": st.sampled_from(["none", "all", "wandb", ["tensorboard"]]),
    "metric_for_best_model": st.one_of(st.none(), st.sampled_from(["loss", "eval_accuracy"])),
}).filter(  # save_strategy="best" saves on a better evaluation metric: it needs both
    lambda k: k.get("save_strategy") != "best" or (k.get("metric_for_best_model") and k.get("eval_strategy", "no") != "no")
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kwargs=VALID, total=st.integers(0, 10**5))
def test_valid_configurations_construct_and_round_trip(kwargs, total):
    a = TrainingArguments(**kwargs)
    assert a.explicit_fields == set(kwargs)
    assert TrainingArguments(**a.to_dict()) == a  # normalisation is idempotent
    assert TrainingArguments.from_dict(json.loads(a.to_json_string())) == a
    assert eval(repr(a), {"TrainingArguments": TrainingArguments}) == a
    assert a.get_warmup_steps(total) >= 0


_ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.lists(st.one_of(st.integers(), st.text(max_size=5)), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from([f.name for f in dataclasses.fields(TrainingArguments)]), value=_ANY_VALUE)
def test_any_value_constructs_or_raises_value_or_type_error(name, value):
    try:
        a = TrainingArguments(**{name: value})
    except (ValueError, TypeError) as exc:
        assert name in str(exc) or "warmup" in str(exc) or "eval_steps" in str(exc)
    else:
        json.dumps(a.to_dict())


_LOWER_BOUNDS = {
    "learning_rate": 0, "weight_decay": 0, "adam_beta1": 0, "adam_beta2": 0, "adam_epsilon": 1e-300,
    "max_grad_norm": 0, "num_train_epochs": 1e-300, "warmup_steps": 0, "warmup_ratio": 0,
    "logging_steps": 0, "save_steps": 0, "eval_steps": 0,
}


@settings(max_examples=150, deadline=None)
@given(name=st.sampled_from(sorted(_LOWER_BOUNDS)), below=st.floats(1e-6, 1e12))
def test_values_below_the_range_raise_value_error(name, below):
    value = _LOWER_BOUNDS[name] - below
    with pytest.raises(ValueError, match=name):
        TrainingArguments(**{name: value})


@pytest.mark.parametrize(("version", "expected"), [
    ("2.4.1+cu121", "adamw_torch"), ("2.7.1", "adamw_torch"),
    ("2.8.0a0+git1234", "adamw_torch_fused"), ("2.8.0", "adamw_torch_fused"), ("2.13.0+cpu", "adamw_torch_fused"),
])
def test_default_optim_follows_transformers_by_torch_version(monkeypatch, version, expected):
    """transformers defaults to the fused AdamW only from torch 2.8 on (a pre-release of 2.8 counts)."""
    import torch

    from optsched.arguments import _default_optim

    monkeypatch.setattr(torch, "__version__", version)
    assert _default_optim() == expected


def test_the_transformers_fields_optsched_does_not_read_are_the_readmes_19():
    # README ("Of transformers 5.23's fields, optsched's Trainer reads all but 19") names these; a field read
    # or a new transformers field fails here until the README says so
    transformers = pytest.importorskip("transformers")
    if transformers.__version__ != "5.23.0":
        pytest.skip(f"the README counts transformers 5.23.0's fields, not {transformers.__version__}'s")
    from optsched.arguments import _DERIVED_FOREIGN_FIELDS, _FIELDS

    unread = {f.name for f in dataclasses.fields(transformers.TrainingArguments)
              if f.name not in _FIELDS and f.name not in _DERIVED_FOREIGN_FIELDS and not f.name.startswith("_")}
    hub = {"push_to_hub", "hub_token", "hub_private_repo", "hub_strategy", "hub_always_push", "hub_revision"}
    trackio = {"project", "trackio_space_id", "trackio_bucket_id", "trackio_static_space_id"}
    sharding = {"fsdp", "fsdp_config", "deepspeed", "parallelism_config"}
    others = {"use_liger_kernel", "liger_kernel_config", "save_on_each_node", "resume_from_checkpoint", "local_rank"}
    assert unread == hub | trackio | sharding | others
    assert len(unread) == 19
