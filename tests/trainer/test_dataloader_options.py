"""The dataloader_* fields: pin memory, persistent workers, prefetch factor, start method (trainer.dataloaders)."""

from __future__ import annotations

import logging
import os
import time

import pytest
import torch

from optsched import Trainer, TrainingArguments


class PidData(torch.utils.data.Dataset):
    """Samples that carry the id of the process that loaded them."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return {"x": torch.full((3,), float(i)), "labels": torch.tensor(float(i)), "pid": torch.tensor(os.getpid())}


class Regressor(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 1)
        self.pids: list[int] = []

    def forward(self, x, labels=None, pid=None):
        self.pids += pid.tolist()
        return {"loss": ((self.linear(x).squeeze(-1) - labels) ** 2).mean()}


def _args(tmp_path, **fields):
    return TrainingArguments(output_dir=str(tmp_path), num_train_epochs=2, per_device_train_batch_size=4,
                             save_strategy="no", disable_tqdm=True, use_cpu=True, seed=0, **fields)


def test_persistent_workers_serve_every_epoch_and_evaluation_with_the_same_batches(tmp_path):
    runs = {}
    for persistent in (False, True):
        torch.manual_seed(0)
        model = Regressor()
        trainer = Trainer(model, _args(tmp_path / str(persistent), dataloader_num_workers=1,
                                       dataloader_persistent_workers=persistent), train_dataset=PidData(),
                          eval_dataset=PidData())
        trainer.train()
        trainer.evaluate()
        trainer.evaluate()
        runs[persistent] = model.linear.weight.detach().clone(), model.pids
    (weights, pids), (persistent_weights, persistent_pids) = runs[False], runs[True]
    assert torch.equal(weights, persistent_weights)
    assert os.getpid() not in pids + persistent_pids  # loaded by the workers
    # training: one worker for both epochs; evaluation: one worker kept for both calls
    assert len(set(persistent_pids[:16])) == 1 and len(set(persistent_pids[16:])) == 1
    assert len(set(pids[:16])) == 2 and len(set(pids[16:])) == 2  # without: new workers each time


def test_worker_options_reach_the_dataloader(tmp_path):
    trainer = Trainer(Regressor(), _args(tmp_path, dataloader_num_workers=2, dataloader_prefetch_factor=3,
                                         dataloader_multiprocessing_context="spawn"),
                      train_dataset=PidData(), eval_dataset=PidData())
    for loader in (trainer.get_train_dataloader(), trainer.get_eval_dataloader()):
        assert loader.prefetch_factor == 3 and loader.multiprocessing_context.get_start_method() == "spawn"
        assert loader.pin_memory is False  # on the CPU, whatever dataloader_pin_memory says
    trainer.device = torch.device("cuda")  # what an accelerator run passes (no CUDA needed to build the loader)
    assert trainer._loader_options()["pin_memory"] is True
    trainer.args.dataloader_pin_memory = False
    assert trainer._loader_options()["pin_memory"] is False


@pytest.mark.parametrize(
    ("fields", "message"),
    [({"dataloader_prefetch_factor": 2}, "dataloader_prefetch_factor=2 applies to worker processes"),
     ({"dataloader_persistent_workers": True}, "dataloader_persistent_workers=True applies"),
     ({"dataloader_multiprocessing_context": "spawn"}, "dataloader_multiprocessing_context='spawn' applies"),
     ({"dataloader_num_workers": 1, "dataloader_multiprocessing_context": "thread"}, "dataloader_multiprocessing_context"),
     ({"dataloader_num_workers": 1, "dataloader_prefetch_factor": 0}, "dataloader_prefetch_factor")],
)
def test_worker_options_without_workers_or_bad_values_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        TrainingArguments(**fields)


class GatedData(torch.utils.data.Dataset):
    """8 samples; loading sample 0 waits (up to 60 s) until sample 4 has been loaded: in batches of 4 over
    two workers, batch 1 is ready before batch 0."""

    def __init__(self, flag):
        self.flag = flag

    def __len__(self):
        return 8

    def __getitem__(self, i):
        if i == 4:
            self.flag.touch()
        if i == 0:
            deadline = time.monotonic() + 60
            while not self.flag.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.3)  # batch 1's worker is already putting it in the queue
        return {"x": torch.full((3,), float(i)), "labels": torch.tensor(float(i))}


@pytest.mark.parametrize("in_order", [True, False])
def test_in_order_false_yields_a_batch_as_soon_as_a_worker_has_it(tmp_path, in_order):
    data = GatedData(tmp_path / "flag")
    trainer = Trainer(Regressor(), _args(tmp_path, dataloader_num_workers=2, dataloader_in_order=in_order,
                                         per_device_eval_batch_size=4), eval_dataset=data)
    firsts = [int(batch["labels"][0]) for batch in trainer.get_eval_dataloader()]
    assert firsts == ([0, 4] if in_order else [4, 0])


def test_in_order_reaches_both_dataloaders_as_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    fields = {"dataloader_num_workers": 2, "dataloader_in_order": False, "use_cpu": True}
    ours = Trainer(Regressor(), TrainingArguments(output_dir=str(tmp_path / "o"), **fields),
                   train_dataset=PidData(), eval_dataset=PidData())
    theirs = transformers.Trainer(Regressor(), transformers.TrainingArguments(
        output_dir=str(tmp_path / "h"), report_to="none", **fields), train_dataset=PidData(), eval_dataset=PidData())
    for trainer in (ours, theirs):
        assert trainer.get_train_dataloader().in_order is False and trainer.get_eval_dataloader().in_order is False
    assert Trainer(Regressor(), _args(tmp_path, dataloader_num_workers=2),
                   train_dataset=PidData()).get_train_dataloader().in_order is True


def test_a_resume_mid_epoch_out_of_order_warns_that_the_skipped_batches_may_differ(tmp_path, caplog):
    trainer = Trainer(Regressor(), _args(tmp_path, dataloader_num_workers=2, dataloader_in_order=False),
                      train_dataset=PidData())
    loader = trainer.get_train_dataloader()
    trainer.state.global_step = 3  # 2 steps an epoch: epoch 1, one step in
    with caplog.at_level(logging.WARNING, logger="optsched"):
        assert trainer._start_position(loader, trainer._plan(len(loader)))[:2] == (1, 1)
    assert "dataloader_in_order=False" in caplog.text and "differ" in caplog.text


def test_in_order_false_on_a_torch_without_it_is_refused(monkeypatch):
    class OldDataLoader:  # torch < 2.6's DataLoader has no in_order
        def __init__(self, dataset, batch_size=1, num_workers=0):
            pass

    monkeypatch.setattr(torch.utils.data, "DataLoader", OldDataLoader)
    with pytest.raises(ValueError, match=r"dataloader_in_order=False needs torch's DataLoader\(in_order=...\).*"
                                         r"accepted: dataloader_in_order=True"):
        TrainingArguments(dataloader_num_workers=2, dataloader_in_order=False)
    TrainingArguments(dataloader_num_workers=2)  # the default needs nothing
