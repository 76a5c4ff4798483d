"""Trainer.explain(): the same report as optsched.explain on the Trainer's own objects."""

from __future__ import annotations

from trainer_helpers import TinyRegressor, make_regression_data

from optsched import Trainer, TrainingArguments, explain


def test_trainer_explain_reports_groups_and_schedule(tmp_path):
    model = TinyRegressor()
    args = TrainingArguments(
        output_dir=str(tmp_path), weight_decay=0.01, warmup_steps=2, max_steps=10, disable_tqdm=True,
        report_to="none",
    )
    trainer = Trainer(model=model, args=args, train_dataset=make_regression_data())
    before = trainer.explain()  # groups and memory are known before any scheduler exists
    assert [g["name"] for g in before.to_dict()["groups"]] == ["decay", "no_decay"]

    trainer.create_scheduler(num_training_steps=10)
    report = trainer.explain()
    expected = explain(trainer.optimizer, trainer.lr_scheduler, model)
    assert report.to_dict() == expected.to_dict()
    text = str(report)
    assert "decay" in text and "no_decay" in text and "inp.weight" in text
