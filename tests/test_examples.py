"""The seed's usage examples (examples/*.py) run as written and show what the seed says they show.

Each example runs in-process with ``runpy`` and writes into ``tmp_path`` (``OPTSCHED_EXAMPLES_DIR``);
its globals (``trainer``, ``model``, ...) are then checked, and where the seed's claim is about
transformers' behaviour, against transformers' own Trainer on the same model.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = sorted(p.name for p in EXAMPLES.glob("[0-9][0-9]_*.py"))

transformers = pytest.importorskip("transformers")



@pytest.fixture
def run_example(monkeypatch, tmp_path, capsys):
    """Run one example; returns ``(globals, stdout)``. ``_common`` is re-imported for each test so
    that its output folder is this test's ``tmp_path``."""
    monkeypatch.setenv("OPTSCHED_EXAMPLES_DIR", str(tmp_path))
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.delitem(sys.modules, "_common", raising=False)

    def run(name: str) -> tuple[dict, str]:
        namespace = runpy.run_path(str(EXAMPLES / name), run_name="__main__")
        return namespace, capsys.readouterr().out

    return run


def _hf_args(tmp_path: Path, **kwargs):
    return transformers.TrainingArguments(output_dir=str(tmp_path / "hf"), report_to="none", use_cpu=True,
                                          disable_tqdm=True, save_strategy="no", **kwargs)


def _group_summary(optimizer, model) -> list[tuple]:
    """Per group: (sorted parameter names, lr, weight decay); comparable across implementations."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [
        (sorted(names[id(p)] for p in g["params"]), g.get("initial_lr", g["lr"]), g["weight_decay"])
        for g in optimizer.param_groups
    ]


def test_every_seed_example_has_a_script_and_a_test():
    assert SCRIPTS == [
        "01_automatic_creation.py",
        "02_custom_trainer.py",
        "03_manual_creation.py",
        "04_optimizer_types.py",
        "05_scheduler_types.py",
        "06_inspect_param_groups.py",
        "07_resume.py",
    ]
    tests = {name for name in globals() if name.startswith("test_example_")}
    assert len(tests) == len(SCRIPTS)


def test_examples_write_only_into_the_given_folder(run_example, tmp_path):
    before = {p for p in Path.cwd().iterdir()}
    run_example("06_inspect_param_groups.py")
    assert {p for p in Path.cwd().iterdir()} == before
    assert all(str(p).startswith(str(tmp_path)) for p in tmp_path.rglob("*"))


def test_example_01_automatic_creation(run_example):
    ns, out = run_example("01_automatic_creation.py")
    trainer = ns["trainer"]
    # the optimizer existed at construction: its repr was printed; the scheduler is made by train()
    assert "Optimizer: AdamW" in out
    assert "Scheduler: None" in out
    assert type(trainer.optimizer) is torch.optim.AdamW
    assert trainer.state.global_step == 12  # 64 examples / batch 16 = 4 steps, x 3 epochs
    spec = trainer.lr_scheduler.state_dict()["spec"]
    assert spec["name"] == "linear" and spec["num_training_steps"] == 12
    assert spec["num_warmup_steps"] == 2  # ceil(0.1 * 12), as transformers
    assert trainer.lr_scheduler.lr_at(12)[0] == 0.0 and trainer.lr_scheduler.lr_at(2)[0] == pytest.approx(5e-5)
    assert [g["weight_decay"] for g in trainer.optimizer.param_groups] == [0.01, 0.0]


def test_example_02_custom_trainer(run_example):
    ns, out = run_example("02_custom_trainer.py")
    trainer, model = ns["trainer"], ns["model"]
    assert type(trainer).__name__ == "CustomTrainer"
    groups = trainer.optimizer.param_groups
    assert type(trainer.optimizer) is torch.optim.AdamW and len(groups) == 4
    # the override's groups are the ones trained: bert at lr/10, the classifier at lr
    assert [g["initial_lr"] for g in groups] == pytest.approx([5e-6, 5e-6, 5e-5, 5e-5])
    assert [g["weight_decay"] for g in groups] == [0.0] * 4  # TrainingArguments' default weight_decay
    names = _group_summary(trainer.optimizer, model)
    assert all(n.startswith("bert.") for n in names[0][0] + names[1][0])
    assert names[2][0] == ["classifier.weight"] and names[3][0] == ["classifier.bias"]
    assert "bert.embeddings.LayerNorm.weight" in names[1][0]
    assert trainer.state.global_step == 24  # 64 / 8 = 8 steps x 3 epochs
    assert "group 0:" in out and "base lr 5e-06" in out


def test_example_03_manual_creation(run_example):
    ns, out = run_example("03_manual_creation.py")
    trainer = ns["trainer"]
    assert ns["total_steps"] == 24  # (64 // (8 * 1)) * 3
    assert "Optimizer: AdamW" in out
    assert "Learning rate: 0.0" in out  # first step of a 500-step warmup
    assert f"Scheduler: {type(trainer.lr_scheduler).__name__}" in out
    assert isinstance(trainer.lr_scheduler, torch.optim.lr_scheduler.LRScheduler)
    spec = trainer.lr_scheduler.state_dict()["spec"]
    assert (spec["name"], spec["num_warmup_steps"], spec["num_training_steps"]) == ("cosine", 500, 24)
    assert type(ns["model"]).__name__ == "GPT2LMHeadModel"


def test_example_04_optimizer_types(run_example, tmp_path):
    pytest.importorskip("bitsandbytes")
    ns, out = run_example("04_optimizer_types.py")
    printed = [line.split("Optimizer: ", 1)[1] for line in out.splitlines() if line.startswith("Optimizer: ")]
    # adamw_8bit is bitsandbytes' AdamW built with optim_bits=8 (as in transformers), hence the name
    assert printed == ["AdamW", "Adafactor", "AdamW", "SGD"]
    # parity: transformers' Trainer picks the same classes with the same group settings
    model = ns["model"]
    modules = []
    for config, name in zip(ns["configs"], printed):
        hf_args = _hf_args(tmp_path, optim=getattr(config.optim, "value", config.optim),
                           learning_rate=config.learning_rate, weight_decay=config.weight_decay,
                           adam_beta1=config.adam_beta1)
        hf_trainer = transformers.Trainer(model=model, args=hf_args, train_dataset=ns["train_dataset"])
        hf_optimizer = hf_trainer.create_optimizer()
        ours = ns["Trainer"](model=model, args=config, train_dataset=ns["train_dataset"]).optimizer
        assert type(ours).__name__ == type(hf_optimizer).__name__ == name
        modules.append(type(ours).__module__.split(".")[0])
        assert type(hf_optimizer).__module__.split(".")[0] in (modules[-1], "transformers")
        assert _group_summary(ours, model) == _group_summary(hf_optimizer, model)
    assert modules == ["torch", "optsched", "bitsandbytes", "torch"]
    ours_8bit = ns["Trainer"](model=model, args=ns["configs"][2], train_dataset=ns["train_dataset"]).optimizer
    assert ours_8bit.args.optim_bits == 8


def _hf_lrs(name: str, warmup: int, total: int, kwargs: dict) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=5e-5)
    scheduler = transformers.get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total,
                                           scheduler_specific_kwargs=kwargs)
    lrs = []
    for _ in range(total + 1):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_example_05_scheduler_types(run_example):
    ns, out = run_example("05_scheduler_types.py")
    printed = [line.split("Scheduler: ", 1)[1] for line in out.splitlines() if line.startswith("Scheduler: ")]
    assert [p.rsplit(".", 1)[-1].lower() for p in printed] == [
        "linear", "cosine", "constant_with_warmup", "polynomial"]
    total = ns["NUM_TRAINING_STEPS"]
    model = ns["model"]
    # each config's schedule equals transformers' for the same warmup and length, at every step
    for config, (name, warmup, kwargs) in zip(ns["scheduler_configs"], [
        ("linear", 200, {}), ("cosine", 1000, {}), ("constant_with_warmup", 100, {}), ("polynomial", 500, {"power": 2.0}),
    ]):
        trainer = ns["Trainer"](model=model, args=config, train_dataset=ns["train_dataset"])
        scheduler = trainer.create_scheduler(num_training_steps=total)
        assert scheduler.state_dict()["spec"]["num_warmup_steps"] == warmup
        ours = [scheduler.lr_at(step)[0] for step in range(total + 1)]
        assert ours == pytest.approx(_hf_lrs(name, warmup, total, kwargs), rel=1e-6, abs=1e-12), name


def test_example_06_inspect_param_groups(run_example, tmp_path):
    ns, out = run_example("06_inspect_param_groups.py")
    trainer, model = ns["trainer"], ns["model"]
    assert out.count("Parameter Group ") == 2
    assert out.count("Learning Rate: 5e-05") == 2
    assert "Weight Decay: 0.01" in out and "Weight Decay: 0.0" in out
    assert "Sample parameters: ['bert.embeddings.word_embeddings.weight'," in out
    assert "Sample parameters: ['bert.embeddings.LayerNorm.weight'," in out
    # the groups are transformers' groups (same parameters, lr and decay)
    hf_trainer = transformers.Trainer(model=model, args=_hf_args(tmp_path, learning_rate=5e-5, weight_decay=0.01),
                                      train_dataset=ns["train_dataset"])
    assert _group_summary(trainer.optimizer, model) == _group_summary(hf_trainer.create_optimizer(), model)


def test_example_07_resume(run_example, tmp_path, monkeypatch):
    # count forward passes: 30 initial steps, then 40 more when resuming from step 10 of 50
    sys.modules.pop("_common", None)
    import _common

    calls = []
    original = _common.build_classifier

    def counted(*args, **kwargs):
        model = original(*args, **kwargs)
        model.register_forward_pre_hook(lambda module, inputs: calls.append(module.training))
        return model

    monkeypatch.setattr(_common, "build_classifier", counted)
    ns, out = run_example("07_resume.py")
    assert "Initial training: 30 steps" in out  # 80 / 8 = 10 steps x 3 epochs
    assert (tmp_path / "checkpoints" / "checkpoint-10" / "optimizer.pt").is_file()
    assert "Resumed from step 10: now at step 50" in out  # 5 epochs
    resumed = ns["trainer_resumed"]
    assert resumed.state.global_step == 50
    assert resumed.lr_scheduler.state_dict()["spec"]["num_training_steps"] == 50
    assert sum(calls) == 30 + 40  # batches before step 10 are not trained again
    state = resumed.optimizer.state[next(iter(ns["model"].parameters()))]
    assert int(state["step"]) == 50


@pytest.mark.parametrize("name", ["02_custom_trainer.py", "06_inspect_param_groups.py"])
def test_examples_fall_back_to_the_demo_model(run_example, monkeypatch, name):
    """Without transformers the examples use optsched's demo model, whose names follow BERT's, so the
    seed's ``"bert" in n`` / ``no_decay`` grouping and the printed sample names stay meaningful."""
    sys.modules.pop("_common", None)
    import _common

    monkeypatch.setattr(_common, "HAS_TRANSFORMERS", False)
    ns, out = run_example(name)
    assert type(ns["model"]).__name__ == "TinyBertForSequenceClassification"
    groups = ns["trainer"].optimizer.param_groups
    if name.startswith("02"):
        assert [len(g["params"]) for g in groups][2:] == [1, 1]  # classifier.weight / classifier.bias
        assert [g["initial_lr"] for g in groups] == pytest.approx([5e-6, 5e-6, 5e-5, 5e-5])
    else:
        assert "Sample parameters: ['bert.embeddings.word_embeddings.weight'," in out
        assert "Sample parameters: ['bert.embeddings.LayerNorm.weight'," in out
        assert [g["weight_decay"] for g in groups] == [0.01, 0.0]

