"""ignore_data_skip: a resume starts the resumed epoch's data from its beginning, as transformers' Trainer
(optsched.trainer.dataloaders' _start_position), and still restores the RNG states."""

from __future__ import annotations

import pytest
import torch

from optsched import Trainer
from trainer_helpers import make_trainer, pad_collate, record_batches, tiny_llama, varied_length_data

# 23 samples, batch 2: 12 batches an epoch, the last one short; GA 2: 6 updates an epoch, 12 in 2 epochs.
# Checkpoint 8 lies 2 updates (4 batches) into epoch 1.
FIELDS = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, num_train_epochs=2, learning_rate=1e-2,
              save_strategy="steps", save_steps=8, logging_steps=1, disable_tqdm=True, use_cpu=True, seed=7)


def _train(kind: str, out, resume=None, **fields):
    """The batches ``kind``'s Trainer trained on (sample indices), its weights and its log."""
    torch.manual_seed(0)
    model = tiny_llama()
    seen = record_batches(model)
    trainer = make_trainer(kind, model, varied_length_data(), pad_collate, output_dir=str(out), **FIELDS, **fields)
    trainer.train(resume_from_checkpoint=resume and str(out / resume))
    return seen, {n: p.detach().clone() for n, p in model.named_parameters()}, trainer.state.log_history


@pytest.mark.parametrize("ignore_data_skip", [True, False])
def test_a_resume_sees_transformers_batches_and_ends_on_its_weights(tmp_path, ignore_data_skip):
    runs = {}
    for kind in ("optsched", "hf"):
        straight, _, _ = _train(kind, tmp_path / kind)
        runs[kind] = _train(kind, tmp_path / kind, "checkpoint-8", ignore_data_skip=ignore_data_skip)
        # epoch 1 from its first batch (8 batches for the 4 remaining steps), or from its fifth
        start = 12 if ignore_data_skip else 16
        assert runs[kind][0] == straight[start:start + 8], kind
    (ours, ours_weights, ours_log), (theirs, theirs_weights, theirs_log) = runs["optsched"], runs["hf"]
    assert ours == theirs
    for name, value in theirs_weights.items():
        assert torch.equal(ours_weights[name], value), name
    # the epoch counts the batches from the epoch's start again: 1 + 2/12 ... 1 + 8/12 with ignore_data_skip
    epochs = [[h["epoch"] for h in log if "loss" in h and h["step"] > 8] for log in (ours_log, theirs_log)]
    assert epochs[0] == epochs[1] and len(epochs[0]) == 4
    assert epochs[0][-1] == pytest.approx(1 + (8 if ignore_data_skip else 12) / 12)


def test_the_rng_states_are_restored(model_factory, regression_data, make_args):
    # dropout draws from the global RNG: two resumes entered with different global RNG states train alike
    # only if the checkpoint's RNG state is restored (36 samples, batch 4, GA 2: 5 updates an epoch; the
    # checkpoint at step 7 lies mid-epoch 1)
    args = dict(max_steps=10, gradient_accumulation_steps=2, save_strategy="steps", save_steps=7)
    Trainer(model_factory(dropout=0.5), make_args(**args), train_dataset=regression_data(36)).train()
    weights = []
    for seed in (1, 2):
        resumed = Trainer(model_factory(dropout=0.5), make_args(**args, ignore_data_skip=True),
                          train_dataset=regression_data(36))
        torch.manual_seed(seed)
        resumed.train(resume_from_checkpoint=f"{resumed.args.output_dir}/checkpoint-7")
        weights.append([p.detach().clone() for p in resumed.model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))


def test_an_iterable_dataset_restarts_from_its_first_item(make_args):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            for i in range(10):
                yield {"x": torch.full((4,), float(i)), "labels": torch.tensor(float(i))}

    from trainer_helpers import TinyRegressor

    seen = []
    args = dict(max_steps=6, per_device_train_batch_size=2, save_strategy="steps", save_steps=3)
    Trainer(TinyRegressor(), make_args(**args), train_dataset=Stream()).train()
    model = TinyRegressor()
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["x"][:, 0].tolist()), with_kwargs=True)
    resumed = Trainer(model, make_args(**args, ignore_data_skip=True), train_dataset=Stream())
    resumed.train(resume_from_checkpoint=f"{resumed.args.output_dir}/checkpoint-3")
    assert seen == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]  # without the flag: [6, 7], [8, 9], then [0, 1]
