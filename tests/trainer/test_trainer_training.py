"""The training loop: a tiny BERT learns; accumulation, logging, evaluation, schedules, precision, data."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from optsched import Trainer, TrainerCallback, TrainingArguments
from trainer_helpers import TinyRegressor


def test_tiny_bert_trains_and_loss_falls(tmp_path, make_args):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                        vocab_size=99, num_labels=2)
    model = BertForSequenceClassification(config)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 99, (32, 8), generator=g)
    labels = (ids[:, 0] > 50).long()  # learnable from the first token
    data = [{"input_ids": ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": labels[i]}
            for i in range(32)]
    t = Trainer(model=model, args=make_args(num_train_epochs=6, per_device_train_batch_size=8, learning_rate=3e-3,
                                            warmup_ratio=0.1, weight_decay=0.01), train_dataset=data,
                eval_dataset=data)
    before = t.evaluate()["eval_loss"]
    out = t.train()
    after = t.evaluate()["eval_loss"]
    assert out.global_step == 24 and t.state.epoch == pytest.approx(6.0)
    losses = [h["loss"] for h in t.state.log_history if "loss" in h]
    assert sum(losses[-4:]) < sum(losses[:4])
    assert after < before * 0.8


def _grads_after_one_step(model_factory, data, ga, bs, tmp_args):
    """Capture the gradient the optimizer sees in step 1 (SGD lr=0 keeps the weights)."""
    seen = []

    class Capture(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if state.global_step == 0:
                seen.append({n: p.grad.clone() for n, p in model.named_parameters()})

    t = Trainer(model_factory(), tmp_args(max_steps=1, gradient_accumulation_steps=ga,
                                          per_device_train_batch_size=bs, max_grad_norm=0.0),
                train_dataset=data, callbacks=[Capture()])
    t.train()
    return seen[0]


def test_accumulation_equals_large_batch(model_factory, regression_data, make_args):
    data = regression_data(16)
    a = _grads_after_one_step(model_factory, data, ga=4, bs=2, tmp_args=make_args)
    b = _grads_after_one_step(model_factory, data, ga=1, bs=8, tmp_args=make_args)
    for n in a:
        torch.testing.assert_close(a[n], b[n])


def test_final_partial_accumulation_is_scaled_by_its_own_size(model_factory, regression_data, make_args):
    """10 samples, batch 2, GA 3: updates of 3 and 2 batches; the second is the mean over its 2 batches."""
    data = regression_data(10)
    grads = []

    class Capture(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})

    model = model_factory()
    reference = model_factory()
    t = Trainer(model, make_args(num_train_epochs=1, gradient_accumulation_steps=3, per_device_train_batch_size=2,
                                 max_grad_norm=0.0, optim="sgd", learning_rate=0.0), train_dataset=data,
                callbacks=[Capture()])
    order = t.get_train_dataloader().sampler.indices()
    t.train()
    assert t.state.global_step == 2 and len(grads) == 2
    batch = torch.utils.data.default_collate([data[i] for i in order[6:10]])  # the last 2 batches = 4 samples
    reference.zero_grad()
    reference(**batch)["loss"].backward()
    for n, p in reference.named_parameters():
        torch.testing.assert_close(grads[1][n], p.grad)


def test_logging_history_jsonl_and_grad_norm(model_factory, regression_data, make_args):
    t = Trainer(model_factory(), make_args(max_steps=6, logging_steps=2), train_dataset=regression_data(16))
    t.train()
    logs = [h for h in t.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == [2, 4, 6]
    assert set(logs[0]) == {"loss", "grad_norm", "learning_rate", "epoch", "step"}
    assert logs[0]["epoch"] == pytest.approx(0.5)
    # the logged lr is the one the step used: linear decay from 1e-2 over 6 steps, step 2 used lr(1)
    assert logs[0]["learning_rate"] == pytest.approx(1e-2 * 5 / 6)
    lines = (t.args.output_dir + "/log_history.jsonl")
    records = [json.loads(line) for line in open(lines)]
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6]
    assert "train_loss" in records[-1]


def test_progress_bar_shows_loss_and_lr(model_factory, regression_data, make_args, capsys):
    t = Trainer(model_factory(), make_args(max_steps=3, disable_tqdm=False), train_dataset=regression_data(8))
    t.train()
    err = capsys.readouterr().err
    assert "3/3" in err and "loss=" in err and "lr=" in err


def test_eval_strategy_steps_and_plateau_scheduler_steps_on_eval_loss(model_factory, regression_data, make_args):
    data = regression_data(16)
    t = Trainer(model_factory(), make_args(max_steps=8, eval_strategy="steps", eval_steps=2, learning_rate=1e-2,
                                           lr_scheduler_type="reduce_lr_on_plateau",
                                           lr_scheduler_kwargs={"patience": 0, "factor": 0.5}),
                train_dataset=data, eval_dataset=data[:8])
    steps = []
    original = t.create_scheduler

    def spy(num_training_steps, optimizer=None):
        sched = original(num_training_steps, optimizer)
        real_step = sched.step
        sched.step = lambda *a, **k: (steps.append(a), real_step(*a, **k))[1]
        return sched

    t.create_scheduler = spy
    t.train()
    evals = [h for h in t.state.log_history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [2, 4, 6, 8]
    assert len(steps) == 4 and all(len(a) == 1 for a in steps)  # one metric step per evaluation, none per step
    assert [a[0] for a in steps] == [h["eval_loss"] for h in evals]


def test_a_dict_of_eval_datasets_is_evaluated_one_by_one_with_its_names(model_factory, regression_data, make_args):
    # transformers accepts eval_dataset={"name": dataset, ...}: each gets the prefix eval_<name>; the
    # dict was indexed as one dataset (KeyError: 0 at the first evaluation, after eval_steps of training)
    small, large = regression_data(4, seed=1), regression_data(12, seed=2)
    t = Trainer(model_factory(), make_args(max_steps=4, eval_strategy="steps", eval_steps=2, metric_for_best_model="small_loss"),
                train_dataset=regression_data(8), eval_dataset={"small": small, "large": large})
    before = t.evaluate()
    assert set(before) >= {"eval_small_loss", "eval_large_loss", "eval_small_runtime"} and "eval_loss" not in before
    assert before["eval_small_loss"] == pytest.approx(t.evaluate(small)["eval_loss"])
    assert before["eval_large_loss"] == pytest.approx(t.evaluate(large)["eval_loss"])
    t.train()
    evals = [h for h in t.state.log_history if "eval_small_loss" in h or "eval_large_loss" in h]
    assert [(h["step"], "eval_small_loss" in h) for h in evals] == [(2, True), (2, False), (4, True), (4, False)]
    assert t.state.best_metric == min(h["eval_small_loss"] for h in evals if "eval_small_loss" in h)


def test_plateau_without_evaluation_is_a_clear_error(model_factory, regression_data, make_args):
    t = Trainer(model_factory(), make_args(max_steps=2, lr_scheduler_type="reduce_lr_on_plateau"),
                train_dataset=regression_data(8))
    with pytest.raises(ValueError, match="steps on an evaluation metric, but eval_strategy='no'"):
        t.train()


def test_schedule_free_optimizer_is_switched_around_eval_and_save(model_factory, regression_data, make_args):
    pytest.importorskip("schedulefree")
    modes = []

    class Watch(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            modes.append(("step", optimizer.param_groups[0]["train_mode"]))

        def on_prediction_step(self, args, state, control, optimizer=None, **kwargs):
            modes.append(("eval", optimizer.param_groups[0]["train_mode"]))

    data = regression_data(8)
    t = Trainer(model_factory(), make_args(max_steps=2, optim="schedule_free_adamw", lr_scheduler_type="constant",
                                           eval_strategy="steps", eval_steps=1, save_strategy="steps",
                                           save_steps=1), train_dataset=data, eval_dataset=data, callbacks=[Watch()])
    t.train()
    assert ("eval", False) in modes and ("step", True) in modes
    assert t.optimizer.param_groups[0]["train_mode"] is True
    saved = torch.load(t.args.output_dir + "/checkpoint-2/optimizer.pt", weights_only=True)
    assert saved["param_groups"][0]["train_mode"] is False  # saved in eval mode (averaged weights)


def test_a_checkpoint_switches_a_schedule_free_optimizer_to_eval_once(model_factory, regression_data, make_args):
    # each eval() / train() pair rounds the training point (x and y are lerps of each other): the finite
    # check and the files were two pairs, so a run that saved drifted twice as far from one that did not
    pytest.importorskip("schedulefree")
    t = Trainer(model_factory(), make_args(max_steps=4, optim="schedule_free_adamw", lr_scheduler_type="constant",
                                           save_strategy="steps", save_steps=2), train_dataset=regression_data(8))
    t.create_optimizer()
    calls = []
    for mode in ("eval", "train"):
        method = getattr(t.optimizer, mode)
        setattr(t.optimizer, mode, lambda method=method, mode=mode: (calls.append(mode), method())[1])
    t.train()
    assert calls.count("eval") == 2  # checkpoint-2 and checkpoint-4
    assert t.optimizer.param_groups[0]["train_mode"] is True


def test_bf16_autocast_on_cpu(model_factory, regression_data, make_args):
    dtypes = []
    model = model_factory()
    model.inp.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    t = Trainer(model, make_args(max_steps=1, bf16=True), train_dataset=regression_data(8))
    t.train()
    assert dtypes == [torch.bfloat16]
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_callback_hooks_order(model_factory, regression_data, make_args):
    events = []

    class Recorder(TrainerCallback):
        pass

    for name in ("on_train_begin", "on_epoch_begin", "on_step_begin", "on_substep_end", "on_pre_optimizer_step",
                 "on_optimizer_step", "on_step_end", "on_log", "on_epoch_end", "on_train_end", "on_save"):
        setattr(Recorder, name, lambda self, *a, _n=name, **k: events.append(_n))
    t = Trainer(model_factory(), make_args(max_steps=1, gradient_accumulation_steps=2, save_strategy="steps",
                                           save_steps=1), train_dataset=regression_data(8), callbacks=[Recorder()])
    t.train()
    assert events == ["on_train_begin", "on_epoch_begin", "on_step_begin", "on_substep_end",
                      "on_pre_optimizer_step", "on_optimizer_step", "on_step_end", "on_log", "on_save",
                      "on_epoch_end", "on_log", "on_train_end"]


def test_callback_can_stop_training(model_factory, regression_data, make_args):
    class StopAt3(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                control.should_training_stop = True
            return control

    t = Trainer(model_factory(), make_args(max_steps=10), train_dataset=regression_data(8), callbacks=[StopAt3])
    assert t.train().global_step == 3


class _StopInsideStep3(TrainerCallback):
    """Sets ``control.<flag>`` after the first micro-batch of step 3 (global_step 2 done), once; records
    the optimizer steps and whether gradients are left at each epoch end."""

    flag = "should_training_stop"

    def __init__(self):
        self.optimizer_steps = 0
        self.grads_at_epoch_end = []
        self.fired = False

    def on_substep_end(self, args, state, control, **kwargs):
        if state.global_step == 2 and not self.fired:
            setattr(control, self.flag, True)
            self.fired = True
        return control

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.optimizer_steps += 1

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        self.grads_at_epoch_end.append(any(p.grad is not None and p.grad.any() for p in model.parameters()))


class _StopEpochInsideStep3(_StopInsideStep3):
    flag = "should_epoch_stop"


def _train_both_stopping(tmp_path, data, callback, logged_steps, **kwargs):
    """Both trainers with ``callback`` (batches of 2, 2 micro-batches per step, a log per step): they end
    at the same step, after as many optimizer steps, logging at ``logged_steps``; ``(both, hf's callback,
    optsched's)``."""
    both = _train_both(tmp_path, data, callbacks=[callback], per_device_train_batch_size=2,
                       gradient_accumulation_steps=2, logging_steps=1, **kwargs)
    (hf_cb,), (ours_cb,) = ([c for c in t.callback_handler.callbacks if isinstance(c, callback)]
                            for t in both.values())
    last = logged_steps[-1]
    assert both["optsched"].state.global_step == both["hf"].state.global_step == last
    assert ours_cb.optimizer_steps == hf_cb.optimizer_steps == last
    assert _steps_with(both["optsched"], "loss") == _steps_with(both["hf"], "loss") == logged_steps
    return both, hf_cb, ours_cb


def test_a_stop_inside_an_accumulation_stops_before_the_step_as_in_transformers(regression_data, tmp_path):
    # transformers breaks right after on_substep_end: the accumulated micro-batch is never stepped on.
    # 8 samples, batches of 2, 2 micro-batches per step: 2 steps per epoch; the stop comes in step 3
    both, hf_cb, ours_cb = _train_both_stopping(tmp_path, regression_data, _StopInsideStep3, [1, 2], max_steps=6)
    hf_weights = dict(both["hf"].model.named_parameters())
    for name, p in both["optsched"].model.named_parameters():
        torch.testing.assert_close(p, hf_weights[name], msg=name)
    # the stopped step's partial gradient is dropped (transformers leaves it in .grad)
    assert ours_cb.grads_at_epoch_end == [False, False] and hf_cb.grads_at_epoch_end[-1]


def test_an_epoch_stop_inside_an_accumulation_ends_the_epoch_before_the_step(regression_data, tmp_path):
    # the second epoch ends after its first micro-batch: no step; the third epoch runs in full
    _, hf_cb, ours_cb = _train_both_stopping(
        tmp_path, regression_data, _StopEpochInsideStep3, [1, 2, 3, 4], num_train_epochs=3
    )
    # transformers carries the dropped micro-batch's gradient into the next epoch's first step; optsched
    # starts that step from zero
    assert ours_cb.grads_at_epoch_end == [False, False, False] and hf_cb.grads_at_epoch_end[1]


def test_transformers_early_stopping_callback_stops_as_in_transformers(regression_data, tmp_path):
    # It reads args.load_best_model_at_end, metric_for_best_model, greater_is_better and state.best_metric:
    # the same patience stops both trainers at the same step.
    transformers = pytest.importorskip("transformers")
    kw = dict(max_steps=40, eval_strategy="steps", eval_steps=1, metric_for_best_model="loss", learning_rate=0.5,
              logging_steps=100, save_strategy="no", disable_tqdm=True, use_cpu=True)
    stopped = {}
    for name, trainer_cls, args_cls, extra in [
        ("hf", transformers.Trainer, transformers.TrainingArguments, {"report_to": "none"}),
        ("optsched", Trainer, TrainingArguments, {}),
    ]:
        torch.manual_seed(0)
        model = TinyRegressor()
        args = args_cls(output_dir=str(tmp_path / name), **kw, **extra)
        trainer = trainer_cls(model, args, train_dataset=regression_data(10), eval_dataset=regression_data(4, seed=1),
                              callbacks=[transformers.EarlyStoppingCallback(early_stopping_patience=2)])
        stopped[name] = (trainer.train().global_step, trainer.state.best_metric)
    assert stopped["optsched"][0] < 40 and stopped["optsched"] == pytest.approx(stopped["hf"])


def _train_both(tmp_path, regression_data, callbacks=(), **kw):
    """Train a TinyRegressor with transformers' Trainer and with optsched's on the same data and settings;
    returns ``{"hf": trainer, "optsched": trainer}``."""
    transformers = pytest.importorskip("transformers")
    kw = dict(dict(learning_rate=0.1, per_device_train_batch_size=4, save_strategy="no", disable_tqdm=True,
                   use_cpu=True), **kw)
    trainers = {}
    for name, trainer_cls, args_cls, extra in [
        ("hf", transformers.Trainer, transformers.TrainingArguments, {"report_to": "none"}),
        ("optsched", Trainer, TrainingArguments, {}),
    ]:
        torch.manual_seed(0)
        args = args_cls(output_dir=str(tmp_path / name), **kw, **extra)
        trainer = trainer_cls(TinyRegressor(), args, train_dataset=regression_data(8),
                              eval_dataset=regression_data(4, seed=1), callbacks=[cb() for cb in callbacks])
        trainer.train()
        trainers[name] = trainer
    return trainers


def _steps_with(trainer, key):
    return [h["step"] for h in trainer.state.log_history if key in h]


@pytest.mark.parametrize(("kw", "log_steps", "eval_steps"), [
    (dict(max_steps=10, logging_steps=4, logging_first_step=True), [1, 4, 8], []),
    (dict(max_steps=10, logging_steps=100, eval_strategy="steps", eval_steps=2, eval_delay=5), [], [6, 8, 10]),
    (dict(max_steps=9, logging_steps=100, eval_strategy="steps", eval_steps=4, eval_delay=3.5), [], [4, 8, 9]),
    (dict(num_train_epochs=4, logging_strategy="epoch", eval_strategy="epoch", eval_delay=2), [2, 4, 6, 8],
     [4, 6, 8]),
])
def test_logging_first_step_and_eval_delay_log_and_evaluate_at_transformers_steps(
        regression_data, tmp_path, kw, log_steps, eval_steps):
    # 8 samples in batches of 4: 2 steps per epoch; eval_delay counts steps, or epochs with eval_strategy="epoch"
    both = _train_both(tmp_path, regression_data, **kw)
    for key, expected in (("loss", log_steps), ("eval_loss", eval_steps)):
        assert _steps_with(both["optsched"], key) == _steps_with(both["hf"], key) == expected, key


def test_an_evaluate_without_training_logs_epoch_0_as_transformers_does(regression_data, tmp_path):
    # transformers 5.23's TrainerState starts at epoch=0 (not None), so its log() adds epoch 0 to an
    # evaluate() before any training; optsched logs and returns the same keys
    transformers = pytest.importorskip("transformers")
    logged = {}
    for name, trainer_cls, args_cls, extra in [
        ("hf", transformers.Trainer, transformers.TrainingArguments, {"report_to": "none"}),
        ("optsched", Trainer, TrainingArguments, {}),
    ]:
        args = args_cls(output_dir=str(tmp_path / name), use_cpu=True, disable_tqdm=True, **extra)
        trainer = trainer_cls(TinyRegressor(), args, eval_dataset=regression_data(4))
        metrics = trainer.evaluate()
        ((entry,),) = [trainer.state.log_history]
        logged[name] = (metrics["epoch"], entry["epoch"], entry["step"],
                        set(entry) - {"eval_model_preparation_time"})  # transformers' timing of its model setup
    assert logged["optsched"] == logged["hf"]
    assert logged["hf"][:3] == (0, 0, 0)


@pytest.mark.parametrize("max_grad_norm", [0.0, 0.5])
def test_grad_norm_is_logged_as_transformers_logs_it_with_and_without_clipping(regression_data, tmp_path,
                                                                               max_grad_norm):
    # transformers logs the pre-clip norm, also with max_grad_norm=0 (clip_grad_norm_ with an infinite
    # bound); optsched logs the norm its non-finite check computes there
    both = _train_both(tmp_path, regression_data, max_steps=4, logging_steps=1, max_grad_norm=max_grad_norm)
    norms = {name: [h["grad_norm"] for h in t.state.log_history if "loss" in h] for name, t in both.items()}
    assert len(norms["optsched"]) == 4 and min(norms["optsched"]) > max_grad_norm
    assert norms["optsched"] == pytest.approx(norms["hf"], rel=1e-5)


def test_transformers_own_flow_printer_and_progress_callbacks_run_under_optsched(regression_data, make_args, capsys):
    # transformers' DefaultFlowCallback reads args.logging_first_step and args.eval_delay: with it added
    # beside optsched's own flow, the same steps are logged and evaluated
    transformers = pytest.importorskip("transformers")
    args = make_args(max_steps=6, logging_steps=4, logging_first_step=True, eval_strategy="steps", eval_steps=2,
                     eval_delay=3)
    t = Trainer(TinyRegressor(), args, train_dataset=regression_data(8), eval_dataset=regression_data(4, seed=1),
                callbacks=[transformers.DefaultFlowCallback, transformers.PrinterCallback,
                           transformers.ProgressCallback])
    t.train()
    assert _steps_with(t, "loss") == [1, 4] and _steps_with(t, "eval_loss") == [4, 6]
    assert "'eval_loss'" in capsys.readouterr().out  # PrinterCallback printed the evaluations


def test_iterable_dataset_needs_max_steps(model_factory, regression_data, make_args):
    items = regression_data(8)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(items)

    with pytest.raises(ValueError, match="max_steps=-1 must be a positive integer when the training dataset has no length"):
        Trainer(model_factory(), make_args(), train_dataset=Stream()).train()
    t = Trainer(model_factory(), make_args(max_steps=5), train_dataset=Stream())
    assert t.train().global_step == 5  # 2 batches per pass: passes repeat until max_steps


def test_tuple_batches_and_compute_loss_func(make_args):
    seen = {}

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 1)

        def forward(self, x):
            return self.lin(x).squeeze(-1)

    def loss_fn(outputs, labels, num_items_in_batch=None):
        seen.setdefault("n", []).append(num_items_in_batch)
        return ((outputs - labels) ** 2).sum() / num_items_in_batch

    data = torch.utils.data.TensorDataset(torch.randn(12, 3), torch.randn(12))
    t = Trainer(Plain(), make_args(max_steps=2, gradient_accumulation_steps=2, per_device_train_batch_size=3),
                train_dataset=data, compute_loss_func=loss_fn)
    t.train()
    assert seen["n"] == [6, 6, 6, 6]  # per micro-batch call, the whole step's label count


@pytest.mark.parametrize("data_seed, same", [(None, True), (7, False)])
def test_data_order_is_seeded(model_factory, regression_data, make_args, data_seed, same):
    a = Trainer(model_factory(), make_args(), train_dataset=regression_data(16)).get_train_dataloader()
    b = Trainer(model_factory(), make_args(data_seed=data_seed), train_dataset=regression_data(16)).get_train_dataloader()
    first = [int(i) for i in a.sampler.indices()]
    assert sorted(first) == list(range(16)) and first != list(range(16))
    assert (first == [int(i) for i in b.sampler.indices()]) is same
