"""total_flos: transformers' estimate, in the train metrics, the state and the checkpoints (optsched.trainer.flops)."""

from __future__ import annotations

import pytest
import torch

from optsched import Trainer, TrainingArguments
from trainer_helpers import PlainRegressor, make_trainer, masked_lm_data, tiny_llama

transformers = pytest.importorskip("transformers")


_Plain = PlainRegressor


def test_total_flos_is_transformers_estimate(tmp_path):
    # 6 x tokens x non-embedding parameters per micro-batch, summed into state.total_flos at each
    # checkpoint (trainer_state.json) and at the end (the train metric); 0 for a model without
    # num_parameters, as in transformers
    import json

    runs = {}
    for name in ("optsched", "hf"):
        kw = dict(output_dir=str(tmp_path / name), max_steps=3, per_device_train_batch_size=2,
                  gradient_accumulation_steps=2, save_steps=2, logging_steps=1, disable_tqdm=True, use_cpu=True,
                  seed=0)
        torch.manual_seed(0)
        trainer = make_trainer(name, tiny_llama(), masked_lm_data(), **kw)
        trainer.train()
        logged = trainer.state.log_history[-1]["total_flos"]  # the train metrics (a printer pops it from them)
        saved = json.loads((tmp_path / name / "checkpoint-2" / "trainer_state.json").read_text())["total_flos"]
        runs[name] = (logged, trainer.state.total_flos, saved)
    assert runs["optsched"] == runs["hf"]
    assert runs["optsched"][0] > runs["optsched"][2] > 0  # 3 steps at the end, 2 in checkpoint-2
    plain = Trainer(_Plain(), TrainingArguments(output_dir=str(tmp_path / "plain"), max_steps=1, save_strategy="no",
                                                use_cpu=True, disable_tqdm=True),
                    train_dataset=[{"x": torch.ones(3), "labels": torch.tensor(1.0)}] * 8)
    plain.train()
    assert plain.state.log_history[-1]["total_flos"] == plain.state.total_flos == 0
