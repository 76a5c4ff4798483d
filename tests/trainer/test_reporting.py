"""log_metrics / save_metrics / save_state: transformers' formats and files (its example scripts call them)."""

from __future__ import annotations

import json
import logging
import types

import pytest

from optsched import Trainer
from optsched.trainer.reporting import format_metrics, metrics_table

METRICS = {"epoch": 3.0, "total_flos": 3 * 2**30 + 5, "train_loss": 0.123456789, "train_runtime": 3725.456,
           "train_samples_per_second": 12.3456, "train_steps_per_second": 3, "init_mem_cpu_alloc_delta": 5 * 2**20}


def _transformers_side(tmp_path):
    transformers_utils = pytest.importorskip("transformers.trainer_pt_utils")
    fake = types.SimpleNamespace(is_world_process_zero=lambda: True, args=types.SimpleNamespace(output_dir=str(tmp_path)))
    return transformers_utils, fake


def test_the_table_is_what_transformers_prints(tmp_path, capsys):
    utils, fake = _transformers_side(tmp_path)
    utils.log_metrics(fake, "train", METRICS)
    assert metrics_table("train", METRICS) == capsys.readouterr().out.splitlines()
    assert format_metrics(METRICS) == utils.metrics_format(METRICS)


def test_files_are_what_transformers_writes(tmp_path, model_factory, make_args, regression_data, caplog):
    utils, fake = _transformers_side(tmp_path / "hf")
    (tmp_path / "hf").mkdir()
    trainer = Trainer(model_factory(), make_args(output_dir=str(tmp_path / "ours"), max_steps=2),
                      train_dataset=regression_data(16))
    metrics = trainer.train().metrics
    with caplog.at_level(logging.INFO, logger="optsched.trainer.reporting"):
        trainer.log_metrics("train", metrics)
    assert "***** train metrics *****" in caplog.text and "train_loss" in caplog.text
    for split, values in (("train", metrics), ("eval", {"eval_loss": 0.5, "epoch": 1.0})):
        trainer.save_metrics(split, values)
        utils.save_metrics(fake, split, values)
    for name in ("train_results.json", "eval_results.json", "all_results.json"):
        assert (tmp_path / "ours" / name).read_text() == (tmp_path / "hf" / name).read_text(), name
    trainer.save_state()
    saved = json.loads((tmp_path / "ours" / "trainer_state.json").read_text())
    assert saved["global_step"] == 2 and saved["log_history"] == trainer.state.log_history


def test_an_unreadable_all_results_is_refused_and_kept(tmp_path, model_factory, make_args):
    trainer = Trainer(model_factory(), make_args(output_dir=str(tmp_path)))
    (tmp_path / "all_results.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"all_results.json is not valid JSON .* left as it is"):
        trainer.save_metrics("eval", {"eval_loss": 1.0})
    assert (tmp_path / "all_results.json").read_text() == "{not json"
    trainer.save_metrics("eval", {"eval_loss": 1.0}, combined=False)  # the split's own file still works
    assert json.loads((tmp_path / "eval_results.json").read_text()) == {"eval_loss": 1.0}
