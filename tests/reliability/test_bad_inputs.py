"""Bad input everywhere public: a table of (call, exception type, words the message must hold).

Every row calls one public entry point with one bad value; the message must name the field and show
the value (and, for names, the accepted ones). A hypothesis test then drives random configurations:
only ValueError / TypeError may come out, and no schedule ever yields a NaN, infinite or negative lr.
"""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import pytest
import torch
from _helpers import Tiny, make_args, make_data
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optsched import (
    TrainingArguments,
    build_param_groups,
    estimate_optimizer_memory,
    freeze_parameters,
    get_last_checkpoint,
    get_optimizer_cls_and_kwargs,
)
from optsched.cli import main as cli_main
from optsched.optim import create_optimizer
from optsched.schedules import get_scheduler, list_schedulers
from optsched.trainer import Trainer

NAN, INF = float("nan"), float("inf")


def _opt() -> torch.optim.Optimizer:
    return torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)


def _frozen() -> torch.nn.Module:
    m = torch.nn.Linear(2, 1)
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def _train(tmp: str, data, **kw):
    Trainer(Tiny(), make_args(tmp, **kw), train_dataset=data).train()


# (id, field-or-call, callable(tmp) -> None, exception type, substrings of the message)
TA = TrainingArguments
ROWS = [
    # ---- TrainingArguments: wrong types --------------------------------------------------------
    ("lr-str", lambda t: TA(learning_rate="1e-3"), TypeError, ["learning_rate", "'1e-3'"]),
    ("lr-bool", lambda t: TA(learning_rate=True), TypeError, ["learning_rate", "True"]),
    ("lr-none", lambda t: TA(learning_rate=None), TypeError, ["learning_rate", "None"]),
    ("wd-list", lambda t: TA(weight_decay=[0.1]), TypeError, ["weight_decay", "[0.1]"]),
    ("bs-float", lambda t: TA(per_device_train_batch_size=8.0), TypeError, ["per_device_train_batch_size", "8.0"]),
    ("ga-str", lambda t: TA(gradient_accumulation_steps="2"), TypeError, ["gradient_accumulation_steps", "'2'"]),
    ("max_steps-float", lambda t: TA(max_steps=10.5), TypeError, ["max_steps", "10.5"]),
    ("seed-str", lambda t: TA(seed="42"), TypeError, ["seed", "'42'"]),
    ("bf16-int", lambda t: TA(bf16=1), TypeError, ["bf16", "1"]),
    ("use_cpu-str", lambda t: TA(use_cpu="yes"), TypeError, ["use_cpu", "'yes'"]),
    ("optim-int", lambda t: TA(optim=3), TypeError, ["optim", "3"]),
    ("sched-int", lambda t: TA(lr_scheduler_type=3), TypeError, ["lr_scheduler_type", "3"]),
    ("output_dir-int", lambda t: TA(output_dir=3), TypeError, ["output_dir", "3"]),
    ("report_to-int", lambda t: TA(report_to=1), TypeError, ["report_to", "1"]),
    ("optim_args-int", lambda t: TA(optim_args=5), TypeError, ["optim_args", "5"]),
    ("sched_kwargs-list", lambda t: TA(lr_scheduler_kwargs=[1]), TypeError, ["lr_scheduler_kwargs", "[1]"]),
    ("save_on_signal-str", lambda t: TA(save_on_signal="yes"), TypeError, ["save_on_signal", "'yes'"]),
    ("save_signals-int", lambda t: TA(save_signals=15), TypeError, ["save_signals", "15"]),
    ("max_nonfinite-float", lambda t: TA(max_consecutive_nonfinite=2.0), TypeError, ["max_consecutive_nonfinite", "2.0"]),
    ("unknown-kw", lambda t: TA(learning_rat=1e-3), TypeError, ["learning_rat", "learning_rate"]),
    # ---- TrainingArguments: negative, NaN / inf, out of range ---------------------------------
    ("lr-neg", lambda t: TA(learning_rate=-1e-3), ValueError, ["learning_rate", "-0.001"]),
    ("lr-nan", lambda t: TA(learning_rate=NAN), ValueError, ["learning_rate", "nan"]),
    ("lr-inf", lambda t: TA(learning_rate=INF), ValueError, ["learning_rate", "inf"]),
    ("wd-neg", lambda t: TA(weight_decay=-0.1), ValueError, ["weight_decay", "-0.1"]),
    ("wd-nan", lambda t: TA(weight_decay=NAN), ValueError, ["weight_decay", "nan"]),
    ("beta1-1", lambda t: TA(adam_beta1=1.0), ValueError, ["adam_beta1", "1.0"]),
    ("beta1-neg", lambda t: TA(adam_beta1=-0.1), ValueError, ["adam_beta1", "-0.1"]),
    ("beta2-big", lambda t: TA(adam_beta2=1.5), ValueError, ["adam_beta2", "1.5"]),
    ("eps-0", lambda t: TA(adam_epsilon=0.0), ValueError, ["adam_epsilon", "0.0"]),
    ("eps-inf", lambda t: TA(adam_epsilon=INF), ValueError, ["adam_epsilon", "inf"]),
    ("clip-neg", lambda t: TA(max_grad_norm=-1.0), ValueError, ["max_grad_norm", "-1.0"]),
    ("epochs-0", lambda t: TA(num_train_epochs=0), ValueError, ["num_train_epochs", "0"]),
    ("epochs-nan", lambda t: TA(num_train_epochs=NAN), ValueError, ["num_train_epochs", "nan"]),
    ("max_steps-0", lambda t: TA(max_steps=0), ValueError, ["max_steps", "0"]),
    ("max_steps--5", lambda t: TA(max_steps=-5), ValueError, ["max_steps", "-5"]),
    ("bs-0", lambda t: TA(per_device_train_batch_size=0), ValueError, ["per_device_train_batch_size", "0"]),
    ("ga-0", lambda t: TA(gradient_accumulation_steps=0), ValueError, ["gradient_accumulation_steps", "0"]),
    ("warmup-neg", lambda t: TA(warmup_steps=-1), ValueError, ["warmup_steps", "-1"]),
    ("warmup-2.5", lambda t: TA(warmup_steps=2.5), ValueError, ["warmup_steps", "2.5"]),
    ("warmup-nan", lambda t: TA(warmup_steps=NAN), ValueError, ["warmup_steps", "nan"]),
    ("warmup_ratio-above-1", lambda t: TA(warmup_ratio=1.5), ValueError, ["warmup_ratio", "1.5"]),
    ("warmup-conflict", lambda t: TA(warmup_steps=5, warmup_ratio=0.1), ValueError, ["warmup_steps=5", "warmup_ratio=0.1"]),
    ("logging_steps-neg", lambda t: TA(logging_steps=-1), ValueError, ["logging_steps", "-1"]),
    ("save_steps-0", lambda t: TA(save_steps=0), ValueError, ["save_steps=0"]),
    ("save_total_limit-0", lambda t: TA(save_total_limit=0), ValueError, ["save_total_limit", "0"]),
    ("seed-neg", lambda t: TA(seed=-1), ValueError, ["seed", "-1"]),
    ("seed-huge", lambda t: TA(seed=2**40), ValueError, ["seed", str(2**40)]),
    ("workers-neg", lambda t: TA(dataloader_num_workers=-1), ValueError, ["dataloader_num_workers", "-1"]),
    ("fp16+bf16", lambda t: TA(fp16=True, bf16=True), ValueError, ["fp16", "bf16"]),
    ("max_nonfinite-neg", lambda t: TA(max_consecutive_nonfinite=-1), ValueError, ["max_consecutive_nonfinite", "-1"]),
    ("empty-output_dir", lambda t: TA(output_dir="  "), ValueError, ["output_dir", "'  '"]),
    ("metric-empty", lambda t: TA(metric_for_best_model=""), ValueError, ["metric_for_best_model", "''"]),
    # ---- TrainingArguments: unknown names and malformed strings ---------------------------------
    ("optim-typo", lambda t: TA(optim="adamw_torhc"), ValueError, ["optim", "'adamw_torhc'", "Did you mean", "adamw_torch"]),
    ("sched-typo", lambda t: TA(lr_scheduler_type="cosin"), ValueError, ["lr_scheduler_type", "'cosin'", "cosine"]),
    ("strategy-typo", lambda t: TA(save_strategy="step"), ValueError, ["save_strategy", "'step'", "steps"]),
    ("eval-strategy-typo", lambda t: TA(eval_strategy="epochs"), ValueError, ["eval_strategy", "'epochs'", "epoch"]),
    ("signal-typo", lambda t: TA(save_signals="SIGTREM"), ValueError, ["save_signals", "SIGTREM", "SIGTERM"]),
    ("signal-kill", lambda t: TA(save_signals="SIGKILL"), ValueError, ["save_signals", "SIGKILL"]),
    ("signal-none", lambda t: TA(save_signals=" , "), ValueError, ["save_signals", "' , '"]),
    ("sched_kwargs-bad-json", lambda t: TA(lr_scheduler_kwargs='{"power": 2'), ValueError, ["lr_scheduler_kwargs", '{"power": 2', "JSON"]),
    ("sched_kwargs-json-list", lambda t: TA(lr_scheduler_kwargs="[1, 2]"), ValueError, ["lr_scheduler_kwargs", "[1, 2]"]),
    ("sched_kwargs-unknown-key", lambda t: TA(lr_scheduler_type="cosine", lr_scheduler_kwargs={"num_cycle": 1}), ValueError, ["lr_scheduler_kwargs", "num_cycle", "num_cycles"]),
    ("sched_kwargs-nan", lambda t: TA(lr_scheduler_type="polynomial", lr_scheduler_kwargs={"power": NAN}), ValueError, ["power", "nan"]),
    ("optim_args-bad-value", lambda t: TA(optim="sgd", optim_args="momentum=abc"), ValueError, ["optim_args", "momentum", "'abc'"]),
    ("optim_args-unknown-key", lambda t: TA(optim="sgd", optim_args="momentun=0.9"), ValueError, ["optim_args", "momentun", "momentum"]),
    ("optim_args-no-equals", lambda t: TA(optim="sgd", optim_args="momentum"), ValueError, ["optim_args", "momentum"]),
    # ---- get_scheduler ---------------------------------------------------------------------------
    ("gs-name", lambda t: get_scheduler("cosin", _opt(), 1, 10), ValueError, ["'cosin'", "cosine"]),
    ("gs-name-type", lambda t: get_scheduler(3, _opt(), 1, 10), TypeError, ["lr_scheduler_type", "3"]),
    ("gs-optimizer", lambda t: get_scheduler("cosine", "sgd", 1, 10), TypeError, ["optimizer", "str"]),
    ("gs-warmup-neg", lambda t: get_scheduler("cosine", _opt(), -1, 10), ValueError, ["num_warmup_steps", "-1"]),
    ("gs-warmup-float", lambda t: get_scheduler("cosine", _opt(), 1.5, 10), TypeError, ["num_warmup_steps", "1.5"]),
    ("gs-total-neg", lambda t: get_scheduler("cosine", _opt(), 1, -10), ValueError, ["num_training_steps", "-10"]),
    ("gs-total-missing", lambda t: get_scheduler("cosine", _opt(), 1, None), ValueError, ["num_training_steps"]),
    ("gs-kwarg-type", lambda t: get_scheduler("cosine", _opt(), 1, 10, {"num_cycles": "x"}), TypeError, ["num_cycles", "'x'"]),
    ("gs-kwarg-unknown", lambda t: get_scheduler("cosine", _opt(), 1, 10, {"bogus": 1}), ValueError, ["bogus", "num_cycles"]),
    ("gs-kwarg-inf", lambda t: get_scheduler("polynomial", _opt(), 1, 10, {"power": INF}), ValueError, ["power", "inf"]),
    ("ls-kind-typo", lambda t: list_schedulers("metrics"), ValueError, ["kind", "'metrics'", "metric", "closed_form"]),
    ("ls-kind-type", lambda t: list_schedulers(1), TypeError, ["kind", "int 1"]),
    # ---- estimate_optimizer_memory / get_last_checkpoint -----------------------------------------
    ("mem-none", lambda t: estimate_optimizer_memory(None, "adamw_torch"), TypeError, ["model_or_groups", "NoneType None"]),
    ("mem-str", lambda t: estimate_optimizer_memory("bert", "adamw_torch"), TypeError, ["model_or_groups", "str 'bert'"]),
    ("glc-none", lambda t: get_last_checkpoint(None), TypeError, ["output_dir", "NoneType None", "path"]),
    ("glc-int", lambda t: get_last_checkpoint(3), TypeError, ["output_dir", "int 3"]),
    # ---- create_optimizer ------------------------------------------------------------------------
    ("co-model-type", lambda t: create_optimizer("model", TA()), TypeError, ["model", "str"]),
    ("co-args-type", lambda t: create_optimizer(torch.nn.Linear(2, 1), 5), TypeError, ["args", "5"]),
    ("co-empty-model", lambda t: create_optimizer(torch.nn.Module(), TA()), ValueError, ["model", "no trainable parameter"]),
    ("co-frozen-model", lambda t: create_optimizer(_frozen(), TA()), ValueError, ["model", "requires_grad"]),
    ("co-args-mapping-typo", lambda t: create_optimizer(torch.nn.Linear(2, 1), {"optim": "sgdd"}), ValueError, ["optim", "'sgdd'", "sgd"]),
    ("gock-model-type", lambda t: get_optimizer_cls_and_kwargs(TA(optim="galore_adamw", optim_target_modules=["0"]), "bert"),
     TypeError, ["model", "str", "'bert'"]),
    # ---- build_param_groups / freeze_parameters --------------------------------------------------
    ("bpg-lr-str", lambda t: build_param_groups(torch.nn.Linear(2, 1), learning_rate="1e-3"), TypeError, ["learning_rate", "'1e-3'"]),
    ("bpg-lr-nan", lambda t: build_param_groups(torch.nn.Linear(2, 1), learning_rate=NAN), ValueError, ["learning_rate", "nan"]),
    ("bpg-lr-neg", lambda t: build_param_groups(torch.nn.Linear(2, 1), learning_rate=-1.0), ValueError, ["learning_rate", "-1.0"]),
    ("freeze-model-type", lambda t: freeze_parameters("bert"), TypeError, ["model", "str", "'bert'"]),
    # ---- the Trainer -----------------------------------------------------------------------------
    ("tr-model-type", lambda t: Trainer("bert", TA(output_dir=t)), TypeError, ["model", "'bert'"]),
    ("tr-frozen", lambda t: Trainer(_frozen(), TA(output_dir=t)), ValueError, ["requires_grad", "trainable"]),
    ("tr-optimizers-shape", lambda t: Trainer(Tiny(), TA(output_dir=t), optimizers=(None,)), TypeError, ["optimizers", "(None,)"]),
    ("tr-loss-func", lambda t: Trainer(Tiny(), TA(output_dir=t), compute_loss_func=3), TypeError, ["compute_loss_func", "int"]),
    ("tr-fp16-cpu", lambda t: Trainer(Tiny(), TA(output_dir=t, fp16=True, use_cpu=True)), ValueError, ["fp16=True", "cpu"]),
    ("tr-empty-dataset", lambda t: _train(t, [], max_steps=2), ValueError, ["0 batches", "empty"]),
    ("tr-no-dataset", lambda t: _train(t, None, max_steps=2), ValueError, ["train_dataset"]),
    ("tr-resume-missing", lambda t: Trainer(Tiny(), make_args(t, max_steps=1), train_dataset=make_data()).train(
        resume_from_checkpoint=True), ValueError, ["resume_from_checkpoint=True", "output_dir"]),
    ("tr-resume-bad-path", lambda t: Trainer(Tiny(), make_args(t, max_steps=1), train_dataset=make_data()).train(
        resume_from_checkpoint=t + "/nope"), ValueError, ["resume_from_checkpoint", "nope", "no such directory"]),
    ("tr-resume-type", lambda t: Trainer(Tiny(), make_args(t, max_steps=1), train_dataset=make_data()).train(
        resume_from_checkpoint=3), TypeError, ["resume_from_checkpoint", "int"]),
    ("tr-train-kw", lambda t: Trainer(Tiny(), make_args(t, max_steps=1), train_dataset=make_data()).train(
        resume=True), TypeError, ["resume", "resume_from_checkpoint"]),
]


def test_the_table_is_big_enough():
    assert len(ROWS) >= 60 and len({r[0] for r in ROWS}) == len(ROWS)


@pytest.mark.parametrize("name,call,exc_type,words", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_is_refused_with_a_message_naming_field_and_value(name, call, exc_type, words, tmp_path):
    with pytest.raises(exc_type) as info:
        call(str(tmp_path / "out"))
    assert type(info.value) is exc_type or issubclass(type(info.value), exc_type)
    message = str(info.value)
    for word in words:
        assert word in message, f"{name}: {word!r} not in {message!r}"
    assert "\n" not in message.strip() or exc_type is not TypeError  # one readable message


def test_warmup_longer_than_training_is_allowed_with_a_warning():
    with pytest.warns(UserWarning, match="num_warmup_steps=20 is longer than num_training_steps=10"):
        sched = get_scheduler("cosine", _opt(), 20, 10)
    assert all(lr >= 0 and math.isfinite(lr) for s in range(12) for lr in sched.lr_at(s))


# ---- the CLI: one line on stderr, exit code 2, never a traceback ------------------------------------

CLI_ROWS = [
    ["schedule", "cosin", "--steps", "10"],
    ["schedule", "cosine", "--steps", "-5"],
    ["schedule", "cosine", "--steps", "10", "--warmup-steps", "-1"],
    ["schedule", "cosine", "--steps", "ten"],
    ["schedule", "cosine", "--steps", "10", "--lr", "nan"],
    ["schedule", "cosine", "--steps", "10", "--kw", "num_cycle=1"],
    ["schedule", "cosine", "--steps", "10", "--kw", "noequals"],
    ["schedule", "polynomial", "--steps", "10", "--kw", "power=Infinity"],
    ["plan", "--learning_rate", "-1"],
    ["plan", "--optim", "adamw_torhc"],
    ["plan", "--lr_scheduler_kwargs", '{"power": 2'],
    ["plan", "--max_consecutive_nonfinite", "-3"],
    ["plan", "--model", "no.such.module:build"],
    ["demo", "--max-steps", "0"],
    ["demo", "--learning-rate", "-1"],
    ["nosuchcommand"],
]


@pytest.mark.parametrize("argv", CLI_ROWS, ids=[" ".join(a) for a in CLI_ROWS])
def test_cli_answers_bad_input_with_one_line_and_exit_code_2(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = cli_main(argv)
    err = capsys.readouterr().err
    assert code == 2, (argv, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "error" in err
    assert list(tmp_path.iterdir()) == []  # nothing trained, nothing written


def test_cli_in_a_real_process_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "optsched", "schedule", "cosine", "--steps", "-3"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "-3" in proc.stderr


# ---- random configurations -------------------------------------------------------------------------

_values = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 2000), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6), st.sampled_from(["cosine", "linear", "steps", "sgd", "{", "[1]", "a=b"]),
)
_FIELDS = ["learning_rate", "weight_decay", "adam_beta1", "warmup_steps", "warmup_ratio", "max_steps",
           "gradient_accumulation_steps", "lr_scheduler_type", "lr_scheduler_kwargs", "optim", "optim_args",
           "save_strategy", "save_steps", "seed", "max_grad_norm", "max_consecutive_nonfinite", "save_signals"]


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.dictionaries(st.sampled_from(_FIELDS), _values, max_size=4))
def test_random_arguments_raise_only_value_or_type_errors(kwargs):
    try:
        TrainingArguments(**kwargs)
    except (ValueError, TypeError) as exc:
        assert str(exc)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    name=st.sampled_from(list_schedulers()),
    warmup=st.integers(0, 60),
    total=st.integers(1, 60),
    lr=st.floats(0, 10, allow_nan=False),
    kwargs=st.dictionaries(
        st.sampled_from(["num_cycles", "power", "lr_end", "min_lr", "min_lr_rate", "num_decay_steps",
                         "num_stable_steps", "decay_type", "warmup_type", "timescale"]),
        st.one_of(st.floats(-2, 5, allow_nan=False), st.integers(-2, 50),
                  st.sampled_from(["linear", "cosine", "1-sqrt", "bogus"])),
        max_size=2,
    ),
)
def test_random_schedules_never_give_a_bad_lr(name, warmup, total, lr, kwargs):
    opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            sched = get_scheduler(name, opt, warmup, total, kwargs)
        except (ValueError, TypeError):
            return
    if not callable(getattr(sched, "lr_at", None)):
        return  # metric-driven schedules have no closed form
    for step in range(0, total + 3):
        for value in sched.lr_at(step):
            assert math.isfinite(value) and value >= 0, (name, warmup, total, kwargs, step, value)
    for _ in range(total + 2):  # stepping agrees
        opt.step()
        sched.step()
        assert all(math.isfinite(g["lr"]) and g["lr"] >= 0 for g in opt.param_groups)
