"""The Trainer's contract: constructor, HF method names, overrides, and errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from optsched import Trainer, TrainerCallback, TrainerState, TrainingArguments


def test_optimizer_exists_right_after_construction(model_factory, regression_data, make_args):
    model = model_factory()
    t = Trainer(model=model, args=make_args(weight_decay=0.01), train_dataset=regression_data(8))
    assert isinstance(t.optimizer, torch.optim.AdamW)
    assert t.lr_scheduler is None  # created with the step count
    groups = {g["name"]: g for g in t.optimizer.param_groups}
    assert groups["decay"]["weight_decay"] == 0.01 and groups["no_decay"]["weight_decay"] == 0.0
    assert set(groups["no_decay"]["param_names"]) == {"inp.bias", "norm.weight", "norm.bias", "out.bias"}
    assert isinstance(t.state, TrainerState) and t.state.global_step == 0


def test_seed_manual_example_create_optimizer_then_scheduler(model_factory, regression_data, make_args):
    t = Trainer(model=model_factory(), args=make_args(lr_scheduler_type="cosine", warmup_steps=5),
                train_dataset=regression_data(8))
    opt = t.optimizer
    assert t.create_optimizer() is opt  # already set: returned as is
    sched = t.create_scheduler(num_training_steps=50)
    assert t.lr_scheduler is sched and t.create_scheduler(num_training_steps=99) is sched
    assert sched.state_dict()["spec"]["num_training_steps"] == 50
    assert t.optimizer.param_groups[0]["lr"] == 0.0  # warmup starts at 0


def test_subclass_create_optimizer_without_argument_is_honoured(model_factory, regression_data, make_args):
    """The seed's CustomTrainer: ``def create_optimizer(self)`` sets self.optimizer and returns None."""
    calls = []

    class CustomTrainer(Trainer):
        def create_optimizer(self):
            calls.append(1)
            model = self.model
            self.optimizer = torch.optim.AdamW(
                [{"params": [p for n, p in model.named_parameters() if n.startswith("inp")], "lr": 1e-4},
                 {"params": [p for n, p in model.named_parameters() if not n.startswith("inp")]}],
                lr=self.args.learning_rate,
            )

    t = CustomTrainer(model=model_factory(), args=make_args(max_steps=2), train_dataset=regression_data(8))
    assert calls == [1] and len(t.optimizer.param_groups) == 2
    t.train()
    assert calls == [1] and t.state.global_step == 2
    assert t.optimizer.param_groups[0]["initial_lr"] == 1e-4


def test_override_that_sets_nothing_is_a_clear_error(model_factory, make_args):
    class Broken(Trainer):
        def create_optimizer(self):
            pass

    with pytest.raises(ValueError, match=r"Broken.create_optimizer\(\) left self.optimizer as None"):
        Broken(model_factory(), make_args())


def test_get_optimizer_cls_and_kwargs_override_is_used(model_factory, make_args):
    class SGDTrainer(Trainer):
        @staticmethod
        def get_optimizer_cls_and_kwargs(args, model=None):
            return torch.optim.SGD, {"lr": args.learning_rate, "momentum": 0.5}

    t = SGDTrainer(model_factory(), make_args())
    assert isinstance(t.optimizer, torch.optim.SGD) and t.optimizer.defaults["momentum"] == 0.5
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(make_args(optim="sgd"))
    assert cls is torch.optim.SGD and kwargs["lr"] == 1e-2


def test_get_decay_parameter_names_override_decides_the_groups(model_factory, make_args):
    class OnlyInputWeightDecays(Trainer):
        def get_decay_parameter_names(self, model):
            return [n for n, _ in model.named_parameters() if n.endswith("inp.weight")]

    args = make_args(weight_decay=0.1)
    t = OnlyInputWeightDecays(model_factory(), args)
    decay, no_decay = t.optimizer.param_groups
    assert decay["param_names"] == ["inp.weight"] and decay["weight_decay"] == 0.1
    assert "out.weight" in no_decay["param_names"] and no_decay["weight_decay"] == 0.0
    assert t.args is args and args.decay_policy == "hf"  # the user's arguments are left as they were
    # without the override: HF's rule (every weight of a non-norm layer decays)
    assert "out.weight" in Trainer(model_factory(), make_args(weight_decay=0.1)).optimizer.param_groups[0]["param_names"]



def test_get_decay_parameter_names_override_names_a_compiled_models_own_parameters(model_factory, make_args):
    # the override is given the model the groups are built from: a torch.compile'd model's wrapped
    # module, whose names are the ones the groups carry (not "_orig_mod.<name>")
    class OutWeightDoesNotDecay(Trainer):
        def get_decay_parameter_names(self, model):
            return [n for n in super().get_decay_parameter_names(model) if n != "out.weight"]

    compiled = torch.compile(model_factory(), backend="eager")
    decay, no_decay = OutWeightDoesNotDecay(compiled, make_args(weight_decay=0.1)).optimizer.param_groups
    assert decay["param_names"] == ["inp.weight"] and decay["weight_decay"] == 0.1
    assert no_decay["param_names"] == ["inp.bias", "norm.weight", "norm.bias", "out.weight", "out.bias"]

def test_optimizer_cls_and_kwargs(model_factory, make_args):
    t = Trainer(model_factory(), make_args(), optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.3}))
    assert isinstance(t.optimizer, torch.optim.SGD) and t.optimizer.param_groups[0]["lr"] == 0.3


def test_optimizers_tuple_is_used_and_conflicts_are_errors(model_factory, make_args):
    model = model_factory()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    t = Trainer(model, make_args(), optimizers=(opt, sched))
    assert t.optimizer is opt and t.lr_scheduler is sched
    with pytest.raises(ValueError, match="optimizer_cls_and_kwargs were both given"):
        Trainer(model, make_args(), optimizers=(opt, None), optimizer_cls_and_kwargs=(torch.optim.SGD, {}))
    with pytest.raises(TypeError, match="optimizers must be a pair"):
        Trainer(model, make_args(), optimizers=opt)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(model="bert"), TypeError, "model must be a torch.nn.Module"),
        (dict(compute_loss_func=3), TypeError, "compute_loss_func must be callable"),
        (dict(data_collator="x"), TypeError, "data_collator must be callable"),
    ],
)
def test_constructor_type_errors(model_factory, make_args, kwargs, exc, match):
    base = dict(model=model_factory(), args=make_args())
    with pytest.raises(exc, match=match):
        Trainer(**{**base, **kwargs})


def test_a_dataset_passed_third_positionally_is_named_as_transformers_order(model_factory, make_args, regression_data):
    # optsched's third parameter was train_dataset; it is data_collator now, as in transformers
    with pytest.raises(TypeError, match=r"data_collator must be callable .* got list; it is the third positional"):
        Trainer(model_factory(), make_args(), regression_data(8))


def test_no_trainable_parameters_is_a_clear_error(model_factory, make_args):
    model = model_factory().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter: all 6 parameters have requires_grad=False"):
        Trainer(model, make_args())


def test_fp16_on_cpu_is_a_clear_error(model_factory, make_args):
    with pytest.raises(ValueError, match="fp16=True needs a CUDA device"):
        Trainer(model_factory(), make_args(fp16=True))


def test_train_without_dataset_and_evaluate_without_dataset(model_factory, make_args):
    t = Trainer(model_factory(), make_args())
    with pytest.raises(ValueError, match="training needs a train_dataset"):
        t.train()
    with pytest.raises(ValueError, match="evaluation needs an eval_dataset"):
        t.evaluate()


@pytest.mark.parametrize("strategy", ["steps", "epoch"])
def test_an_eval_strategy_without_eval_dataset_is_refused_before_training(model_factory, make_args, strategy):
    # Found at the first evaluation instead, the run would fail after eval_steps of training.
    with pytest.raises(ValueError, match=f"eval_strategy='{strategy}' needs an eval_dataset"):
        Trainer(model_factory(), make_args(eval_strategy=strategy, eval_steps=4), train_dataset=[])


def test_an_output_dir_that_cannot_hold_files_is_refused_before_the_first_step(model_factory, make_args, tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("the user's")
    for output_dir in (a_file, a_file / "run"):
        trainer = Trainer(model_factory(), make_args(output_dir=str(output_dir)), train_dataset=[{"x": [0.0]}] * 4)
        with pytest.raises(ValueError, match=r"output_dir=.*notes.txt.* cannot hold the run's logs and checkpoints"):
            trainer.train()
        assert trainer.state.global_step == 0
    assert a_file.read_text() == "the user's"


def test_model_without_loss_is_a_clear_error(make_args):
    class NoLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 1)

        def forward(self, x):
            return self.lin(x)

    data = [{"x": torch.randn(2)} for _ in range(4)]
    t = Trainer(NoLoss(), make_args(max_steps=1), train_dataset=data)
    with pytest.raises(ValueError, match=r"returned no loss .*compute_loss_func"):
        t.train()


class _TupleRegressor(nn.Module):
    """Returns ``(loss, logits)`` with labels and ``(logits,)`` without, as a transformers model with
    ``return_dict=False``."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 1)

    def forward(self, x, labels=None):
        logits = self.lin(x).squeeze(-1)
        return (logits,) if labels is None else (((logits - labels) ** 2).mean(), logits)


def test_a_tuple_output_gives_its_first_item_as_the_loss(make_args, regression_data):
    # transformers' Trainer reads a tuple's loss as outputs[0]; the same model trains here
    torch.manual_seed(0)
    model = _TupleRegressor()
    t = Trainer(model, make_args(max_steps=3), train_dataset=regression_data(12), eval_dataset=regression_data(8))
    with torch.no_grad():
        expected = ((model.lin(torch.stack([d["x"] for d in regression_data(8)])).squeeze(-1)
                     - torch.stack([d["labels"] for d in regression_data(8)])) ** 2).mean()
    assert t.evaluate()["eval_loss"] == pytest.approx(expected.item(), rel=1e-6)
    out = t.train()
    assert out.global_step == 3 and math.isfinite(out.training_loss)
    loss, outputs = t.compute_loss(t.model, {"x": torch.randn(2, 4), "labels": torch.zeros(2)}, return_outputs=True)
    assert loss is outputs[0]


def test_a_tuple_whose_first_item_is_not_a_scalar_is_no_loss(make_args):
    # without labels the tuple holds the logits: never taken for a loss (one with a single element
    # would pass the scalar check of a batch of 1)
    t = Trainer(_TupleRegressor(), make_args(max_steps=1), train_dataset=[{"x": torch.randn(4)}] * 4)
    with pytest.raises(ValueError, match=r"returned no loss \(output type tuple\)"):
        t.train()


def test_args_none_gives_defaults_and_transformers_args_are_accepted(model_factory, tmp_path):
    t = Trainer(model_factory())
    assert t.args.output_dir == "trainer_output" and t.args.learning_rate == 5e-5
    from transformers import TrainingArguments as HFArgs

    hf = HFArgs(output_dir=str(tmp_path), learning_rate=3e-4, weight_decay=0.1, report_to="none")
    t = Trainer(model_factory(), hf)
    assert isinstance(t.args, TrainingArguments) and t.optimizer.defaults["lr"] == 3e-4


def test_decay_parameter_names_and_callbacks_api(model_factory, make_args):
    t = Trainer(model_factory(), make_args())
    assert set(t.get_decay_parameter_names(t.model)) == {"inp.weight", "out.weight"}

    class CB(TrainerCallback):
        pass

    t.add_callback(CB)
    assert isinstance(t.pop_callback(CB), CB)
    with pytest.raises(TypeError, match="has none of the hooks"):
        t.add_callback(object())


def test_param_groups_match_transformers_trainer_on_bert(tmp_path):
    """Same decay / no-decay split as transformers' Trainer.create_optimizer on a tiny BERT."""
    from transformers import BertConfig, BertForSequenceClassification
    from transformers import Trainer as HFTrainer
    from transformers import TrainingArguments as HFArgs

    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                        vocab_size=99, num_labels=2)
    model = BertForSequenceClassification(config)
    hf_args = HFArgs(output_dir=str(tmp_path / "hf"), weight_decay=0.01, report_to="none", use_cpu=True)
    hf = HFTrainer(model=model, args=hf_args)
    hf.create_optimizer()
    ours = Trainer(model, TrainingArguments(output_dir=str(tmp_path / "ours"), weight_decay=0.01))
    ids = lambda opt: [({id(p) for p in g["params"]}, g["weight_decay"]) for g in opt.param_groups]  # noqa: E731
    assert ids(ours.optimizer) == ids(hf.optimizer)
    assert type(ours.optimizer) is type(hf.optimizer)


def test_constructor_parameters_are_transformers_in_its_order():
    # a call written for transformers.Trainer binds the same, also positionally: Trainer(model, args,
    # collator, train_ds) gave the collator as train_dataset and the dataset as eval_dataset
    import inspect

    from transformers import Trainer as HFTrainer

    ours = list(inspect.signature(Trainer.__init__).parameters)
    theirs = list(inspect.signature(HFTrainer.__init__).parameters)
    assert ours == theirs


def test_a_positional_call_binds_as_in_transformers(model_factory, regression_data, make_args):
    collate = torch.utils.data.default_collate
    train, evaluation = regression_data(8), regression_data(4, seed=1)
    t = Trainer(model_factory(), make_args(), collate, train, evaluation)
    assert t.data_collator is collate and t.train_dataset is train and t.eval_dataset is evaluation


@pytest.mark.parametrize(
    "keyword, what_to_do",
    [
        ("processing_class", r"processing_class.save_pretrained\(output_dir\) yourself"),
        ("model_init", r"Trainer\(model=model_init\(\), ...\)"),
    ],
)
def test_transformers_keywords_optsched_does_not_honour_are_refused(model_factory, make_args, keyword, what_to_do):
    # never accepted and dropped: a tokenizer that is not saved, a hyperparameter search that never runs
    with pytest.raises(TypeError, match=rf"Trainer\({keyword}=...\) is not supported .*got function.*{what_to_do}"):
        Trainer(model_factory(), make_args(), **{keyword: lambda *a: None})
    assert Trainer(model_factory(), make_args(), **{keyword: None}).optimizer is not None


@pytest.mark.parametrize("report_to, named", [("tensorboard", "tensorboard"), (["wandb", "tensorboard"], "wandb or tensorboard"),
                                              ("all", "all")])
def test_report_to_an_integration_warns_that_nothing_is_sent(model_factory, make_args, caplog, report_to, named):
    # transformers would write tensorboard events / a wandb run; here it was dropped without a word
    args = make_args(report_to=report_to)
    with caplog.at_level("WARNING", logger="optsched.trainer.trainer"):
        Trainer(model_factory(), args)
    assert f"nothing is sent to {named}" in caplog.text
    assert str(args.report_to) in caplog.text and "log_history.jsonl" in caplog.text and "report_to='none'" in caplog.text


def test_report_to_none_says_nothing(model_factory, make_args, caplog):
    with caplog.at_level("WARNING", logger="optsched.trainer.trainer"):
        Trainer(model_factory(), make_args(report_to="none"))
        Trainer(model_factory(), make_args(report_to=None))
    assert "report_to" not in caplog.text


def test_train_metrics_have_transformers_keys(model_factory, regression_data, make_args):
    # a script that reads train_result.metrics["train_samples_per_second"] (transformers' examples log it)
    t = Trainer(model_factory(), make_args(max_steps=3, gradient_accumulation_steps=2), train_dataset=regression_data(32))
    metrics = t.train().metrics
    assert {"train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss"} <= set(metrics)
    # 4 samples a batch, 2 batches a step
    assert metrics["train_samples_per_second"] == pytest.approx(8 * metrics["train_steps_per_second"], rel=0.01)


@pytest.mark.parametrize(
    "kwargs, samples_per_step",
    [
        (dict(num_train_epochs=2, gradient_accumulation_steps=2), 13 * 2 / 4),  # 4 + 4 + 4 + 1 a pass: 2 steps
        (dict(num_train_epochs=1.5, per_device_train_batch_size=3), 13 * 1.5 / 8),  # ceil(1.5 * 5) = 8 steps
        (dict(num_train_epochs=2, dataloader_drop_last=True), 13 * 2 / 6),  # dropped samples count too
        (dict(max_steps=5, gradient_accumulation_steps=2), 8),  # a full step's samples per step
    ],
    ids=["epochs-short-batch", "fractional-epochs", "drop-last", "max-steps"],
)
def test_train_samples_per_second_counts_samples_as_transformers(
    model_factory, regression_data, make_args, tmp_path, kwargs, samples_per_step
):
    # transformers' rule: len(dataset) * num_train_epochs by epochs, max_steps * total batch otherwise (the
    # samples of a full step were counted for every step, the short last batch of a pass as a full one)
    def ratio(trainer):
        metrics = trainer.train().metrics
        return metrics["train_samples_per_second"] / metrics["train_steps_per_second"]

    ours = ratio(Trainer(model_factory(), make_args(**kwargs), train_dataset=regression_data(13)))
    assert ours == pytest.approx(samples_per_step, rel=1e-3)
    transformers = pytest.importorskip("transformers")
    hf_args = transformers.TrainingArguments(**{
        "output_dir": str(tmp_path / "hf"), "per_device_train_batch_size": 4, "save_strategy": "no",
        "report_to": "none", "disable_tqdm": True, "use_cpu": True, **kwargs,
    })
    hf = ratio(transformers.Trainer(model_factory(), hf_args, train_dataset=regression_data(13)))
    assert ours == pytest.approx(hf, rel=1e-3)


def test_train_with_a_trial_is_refused(model_factory, regression_data, make_args):
    # hyperparameter search's trial was accepted and dropped: the run trained with the arguments as they were
    t = Trainer(model_factory(), make_args(max_steps=1), train_dataset=regression_data(8))
    with pytest.raises(TypeError, match=r"train\(trial=...\) is not supported \(got dict\).*hyperparameter_search"):
        t.train(trial={"learning_rate": 1e-3})
    assert t.state.global_step == 0
    assert t.train(trial=None, ignore_keys_for_eval=["past_key_values"]).global_step == 1


@pytest.mark.parametrize("keyword", ["compute_metrics", "preprocess_logits_for_metrics"])
def test_metrics_keywords_are_accepted(model_factory, make_args, keyword):
    fn = lambda *a: {}  # noqa: E731
    assert getattr(Trainer(model_factory(), make_args(), **{keyword: fn}), keyword) is fn
