"""torch_compile (torch_compile_backend, torch_compile_mode): the Trainer trains and evaluates a compiled
wrapper of its model (optsched.trainer.compile). Checkpoints and resume: test_trainer_resume.py; DDP:
test_trainer_ddp.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from optsched import Trainer, TrainingArguments
from optsched.arguments import as_training_arguments
from trainer_helpers import PlainRegressor, make_trainer, masked_lm_data, tiny_llama

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _fresh_compiler():
    # torch.compile keeps compiled code per code object for the whole process, up to 8 variants before it
    # falls back to eager without failing: each test starts from none, so that it tests compiled code
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _train(kind, model, tmp_path, **fields):
    kw = dict(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2,
              learning_rate=1e-2, logging_steps=1, save_strategy="no", disable_tqdm=True, use_cpu=True, seed=0,
              **fields)
    trainer = make_trainer(kind, model, masked_lm_data(), **kw)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return trainer, model.state_dict(), losses


def _assert_same_weights(ours, theirs):
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], v) for k, v in theirs.items())


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_training_is_the_uncompiled_training_bitwise(tmp_path, backend):
    # tiny Llama, labels ending in different numbers of -100, GA 2: the same weights and losses. use_cache=True:
    # without its cache a compiled Llama builds an explicit causal mask where eager mode passes is_causal to
    # SDPA, 1e-7 away (transformers' Trainer the same: its default, use_cache=False, is tested below)
    torch.manual_seed(0)
    _, plain, plain_losses = _train("optsched", tiny_llama(), tmp_path / "plain", use_cache=True)
    torch.manual_seed(0)
    model = tiny_llama()
    trainer, compiled, losses = _train("optsched", model, tmp_path / backend, torch_compile_backend=backend,
                                       use_cache=True)
    assert trainer.model is model  # the model's own names, for checkpoints and the user
    assert type(trainer.model_wrapped).__name__ == "OptimizedModule" and trainer.model_wrapped._orig_mod is model
    _assert_same_weights(compiled, plain)
    assert losses == plain_losses


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_training_is_transformers_trainer_bitwise(tmp_path, backend):
    # Both Trainers set model.config.use_cache = args.use_cache (False) when built: compiled, a Llama with its
    # cache takes another attention path (is_causal where it is otherwise an explicit mask), 1e-7 away
    runs = {}
    for name in ("optsched", "hf"):
        torch.manual_seed(0)
        model = tiny_llama()
        trainer, weights, losses = _train(name, model, tmp_path / name, torch_compile_backend=backend)
        assert type(trainer.model_wrapped).__name__ == "OptimizedModule"
        runs[name] = weights, losses
    _assert_same_weights(runs["optsched"][0], runs["hf"][0])
    assert runs["optsched"][1] == runs["hf"][1]


def test_use_cache_is_set_on_the_models_config_as_transformers_does(tmp_path):
    for use_cache in (False, True):
        model = tiny_llama()
        model.config.use_cache = not use_cache
        Trainer(model, TrainingArguments(output_dir=str(tmp_path), use_cpu=True, use_cache=use_cache))
        assert model.config.use_cache is use_cache
    Trainer(torch.nn.Linear(2, 1), TrainingArguments(output_dir=str(tmp_path), use_cpu=True))  # no config: nothing to set


def test_evaluation_runs_a_compiled_wrapper_and_gives_the_uncompiled_loss(tmp_path):
    data = masked_lm_data()
    metrics = {}
    for name, fields in (("plain", {}), ("compiled", {"torch_compile_backend": "eager"})):
        torch.manual_seed(0)
        model = tiny_llama()
        args = TrainingArguments(output_dir=str(tmp_path / name), max_steps=2, per_device_train_batch_size=2,
                                 per_device_eval_batch_size=5, eval_strategy="steps", eval_steps=1,
                                 save_strategy="no", disable_tqdm=True, use_cpu=True, **fields)
        trainer = Trainer(model, args, train_dataset=data, eval_dataset=data)  # 12 samples: a last batch of 2
        model.eval()
        before = trainer.evaluate()
        assert not model.training  # the mode it had is restored
        trainer.train()
        metrics[name] = before, [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e]
        if fields:
            evaluated = trainer._evaluation_model()
            assert evaluated is not model and evaluated._orig_mod is model
            assert trainer._evaluation_model() is evaluated  # compiled once
    assert metrics["compiled"][0]["eval_loss"] == metrics["plain"][0]["eval_loss"]
    assert metrics["compiled"][1] == metrics["plain"][1] and len(metrics["plain"][1]) == 2


def test_the_backend_or_the_mode_turns_torch_compile_on_as_transformers(tmp_path):
    for fields in ({"torch_compile": True}, {"torch_compile_backend": "aot_eager"},
                   {"torch_compile_mode": "reduce-overhead"}, {"torch_compile": False}):
        ours = TrainingArguments(**fields)
        theirs = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, **fields)
        expected = (theirs.torch_compile, theirs.torch_compile_backend, theirs.torch_compile_mode)
        assert (ours.torch_compile, ours.torch_compile_backend, ours.torch_compile_mode) == expected
        converted = as_training_arguments(theirs)
        assert (converted.torch_compile, converted.torch_compile_backend, converted.torch_compile_mode) == expected
    # derived values are derived again by replace (transformers keeps the stale backend, which would turn
    # torch_compile back on)
    args = dataclasses.replace(TrainingArguments(torch_compile=True), torch_compile=False)
    assert (args.torch_compile, args.torch_compile_backend) == (False, None)
    args = dataclasses.replace(TrainingArguments(torch_compile_backend="eager"), torch_compile_backend=None)
    assert (args.torch_compile, args.torch_compile_backend) == (False, None)


def test_bad_values_are_refused_naming_the_field_the_value_and_what_is_accepted():
    with pytest.raises(ValueError, match=r"torch_compile_backend='eagr' is not a known torch.compile backend\. "
                                         r"Did you mean one of 'eager', 'aot_eager'\? Accepted: .*\beager\b.*\binductor\b"):
        TrainingArguments(torch_compile_backend="eagr")
    with pytest.raises(ValueError, match=r"torch_compile_mode='max_autotune' is not a known torch.compile mode\. "
                                         r"Did you mean 'max-autotune'\? Accepted: default, .*reduce-overhead"):
        TrainingArguments(torch_compile_mode="max_autotune")
    with pytest.raises(TypeError, match="torch_compile_backend must be a string, got function"):
        TrainingArguments(torch_compile_backend=lambda gm, inputs: gm)
    with pytest.raises(TypeError, match="torch_compile must be True or False, got str 'yes'"):
        TrainingArguments(torch_compile="yes")


def test_a_backend_assigned_after_construction_still_compiles(tmp_path):
    # an assignment checks the field but runs no rule across fields: torch_compile stays False, and the
    # Trainer applies the rule again rather than train uncompiled without a word
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, save_strategy="no", disable_tqdm=True,
                             use_cpu=True)
    args.torch_compile_backend = "eager"
    assert args.torch_compile is False
    trainer = Trainer(PlainRegressor(), args, train_dataset=[{"x": torch.ones(3), "labels": torch.tensor(1.0)}] * 8)
    trainer.train()
    assert type(trainer.model_wrapped).__name__ == "OptimizedModule"


@pytest.mark.slow
def test_inductor_trains_a_small_model_to_the_uncompiled_weights(tmp_path):
    # the one test that runs torch's C++ compiler (~15-20 s on a 2-core CPU, cold): torch_compile=True means
    # inductor. Bitwise here; inductor may fuse differently elsewhere, hence the tolerance of a few ulps
    g = torch.Generator().manual_seed(0)
    data = [{"x": torch.randn(3, generator=g), "labels": torch.randn((), generator=g)} for _ in range(12)]
    runs = {}
    for name, fields in (("plain", {}), ("inductor", {"torch_compile": True})):
        torch.manual_seed(0)
        model = PlainRegressor()
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        args = TrainingArguments(output_dir=str(tmp_path / name), max_steps=3, per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2, learning_rate=1e-1, save_strategy="no",
                                 disable_tqdm=True, use_cpu=True, **fields)
        trainer = Trainer(model, args, train_dataset=data)
        trainer.train()
        runs[name] = model.state_dict()
    assert trainer.args.torch_compile_backend == "inductor"
    assert type(trainer.model_wrapped).__name__ == "OptimizedModule"
    for key, value in runs["plain"].items():
        torch.testing.assert_close(runs["inductor"][key], value, rtol=1e-6, atol=1e-7)
        assert not torch.equal(value, initial[key])  # it trained
