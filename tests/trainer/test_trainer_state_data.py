"""TrainerState / callbacks flow, step arithmetic (parity with transformers), sampler and batch helpers."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optsched.trainer.data import (
    EpochSampler,
    ShardedIterable,
    iter_update_groups,
    move_to_device,
    plan_training,
    scalar_to_device,
    split_model_inputs,
)
from optsched.trainer.state import TrainerControl, TrainerState


def test_state_json_round_trip_and_unknown_keys(tmp_path, caplog):
    s = TrainerState(global_step=3, epoch=1.5, log_history=[{"loss": 1.0, "step": 3}], best_metric=0.5)
    s.save_to_json(tmp_path / "s.json")
    assert TrainerState.load_from_json(tmp_path / "s.json") == s
    from transformers import TrainerState as HFState

    hf = HFState(global_step=4, max_steps=9, log_history=[{"loss": 2.0, "step": 4}])
    hf.save_to_json(str(tmp_path / "hf.json"))
    ours = TrainerState.load_from_json(tmp_path / "hf.json")
    assert (ours.global_step, ours.max_steps, ours.log_history) == (4, 9, hf.log_history)
    (tmp_path / "new.json").write_text('{"global_step": 1, "new_field": 2}')
    assert TrainerState.load_from_json(tmp_path / "new.json").global_step == 1
    assert "new_field" in caplog.text


def test_compute_steps_ratio():
    from optsched import TrainingArguments

    s = TrainerState()
    s.compute_steps(TrainingArguments(logging_steps=0.1, save_steps=7, eval_strategy="steps", eval_steps=0.25), 50)
    assert (s.logging_steps, s.save_steps, s.eval_steps) == (5, 7, 13)


def test_control_state_is_transformers_shape():
    c = TrainerControl(should_save=True)
    assert c.state() == {"args": {"should_training_stop": False, "should_epoch_stop": False, "should_save": True,
                                  "should_evaluate": False, "should_log": False}, "attributes": {}}


def _hf_plan(batches, max_steps, epochs, ga):
    """transformers' set_initial_training_values arithmetic, restated from trainer.py for the table."""
    updates = max(batches // ga + int(batches % ga > 0), 1)
    total = max_steps if max_steps > 0 else math.ceil(epochs * updates)
    num_epochs = (total // updates + int(total % updates > 0)) if max_steps > 0 else math.ceil(epochs)
    return total, num_epochs, updates


@pytest.mark.parametrize(
    "batches, max_steps, epochs, ga, expected_max_steps",
    [(10, -1, 3, 1, 30), (10, -1, 3, 4, 9), (9, -1, 2.5, 2, 13), (1, -1, 1, 8, 1), (10, 7, 3, 1, 7), (10, 25, 1, 3, 25)],
)
def test_plan_matches_transformers(batches, max_steps, epochs, ga, expected_max_steps):
    plan = plan_training(batches, max_steps=max_steps, num_train_epochs=epochs, gradient_accumulation_steps=ga)
    assert (plan.max_steps, plan.num_train_epochs, plan.updates_per_epoch) == _hf_plan(batches, max_steps, epochs, ga)
    assert plan.max_steps == expected_max_steps


@settings(max_examples=60, deadline=None)
@given(batches=st.integers(1, 200), ga=st.integers(1, 16), epochs=st.floats(0.1, 5))
def test_plan_property_matches_transformers(batches, ga, epochs):
    plan = plan_training(batches, max_steps=-1, num_train_epochs=epochs, gradient_accumulation_steps=ga)
    assert (plan.max_steps, plan.num_train_epochs, plan.updates_per_epoch) == _hf_plan(batches, -1, epochs, ga)


def test_plan_errors():
    with pytest.raises(ValueError, match="max_steps=-1 must be a positive integer"):
        plan_training(None, max_steps=-1, num_train_epochs=3, gradient_accumulation_steps=1)
    with pytest.raises(ValueError, match="0 batches per epoch"):
        plan_training(0, max_steps=-1, num_train_epochs=3, gradient_accumulation_steps=1)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 60), world=st.integers(1, 4), seed=st.integers(0, 2**31), epoch=st.integers(0, 5),
       drop_last=st.booleans())
def test_sampler_shards_cover_the_epoch_permutation(n, world, seed, epoch, drop_last):
    shards = []
    for rank in range(world):
        s = EpochSampler(n, seed=seed, rank=rank, world_size=world, drop_last=drop_last)
        s.set_epoch(epoch)
        shards.append(list(s))
        assert len(shards[-1]) == len(s)
    single = EpochSampler(n, seed=seed)
    single.set_epoch(epoch)
    order = list(single)
    per_rank = len(shards[0])
    interleaved = [shards[r][i] for i in range(per_rank) for r in range(world)]
    assert interleaved == (order * world)[: per_rank * world]  # DistributedSampler's split of the same order


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 60), world=st.integers(1, 5), shuffle=st.booleans())
def test_an_unpadded_sampler_takes_every_index_once(n, world, shuffle):
    shards = [list(EpochSampler(n, seed=1, shuffle=shuffle, rank=r, world_size=world, pad=False)) for r in range(world)]
    assert sorted(i for shard in shards for i in shard) == list(range(n))
    assert [len(shard) for shard in shards] == [len(EpochSampler(n, seed=1, rank=r, world_size=world, pad=False))
                                                 for r in range(world)]
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_the_eval_loader_of_each_rank_takes_its_share_once(model_factory, make_args, regression_data):
    # 10 samples over 4 processes: the padded split gave ranks 2 and 3 samples 0 and 1 again, and the
    # eval loss (summed over ranks) counted them twice
    from optsched import Trainer
    from optsched.trainer.distributed import DistributedContext

    data = [dict(d, i=torch.tensor(i)) for i, d in enumerate(regression_data(10))]
    # remove_unused_columns=False: "i" (no argument of forward) reaches the batches
    t = Trainer(model_factory(), make_args(per_device_eval_batch_size=2, remove_unused_columns=False), eval_dataset=data)
    seen = []
    for rank in range(4):
        t.dist = DistributedContext(rank=rank, local_rank=rank, world_size=4)
        seen += [int(i) for batch in t.get_eval_dataloader() for i in batch["i"]]
    assert sorted(seen) == list(range(10))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 40), world=st.integers(1, 5), drop_last=st.booleans())
def test_a_padded_iterable_shard_is_the_samplers_split_of_the_stream(n, world, drop_last):
    # every rank the same number of items (hence of batches and steps under DDP), split as EpochSampler
    # splits range(n): a rank with an item more ran a step of its own and the ranks' collectives diverged
    shards = [list(ShardedIterable(range(n), r, world, pad=True, drop_last=drop_last)) for r in range(world)]
    expected = [list(EpochSampler(n, seed=0, shuffle=False, rank=r, world_size=world, drop_last=drop_last))
                for r in range(world)]
    assert shards == expected
    assert len({len(shard) for shard in shards}) == 1


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 40), world=st.integers(1, 5))
def test_an_unpadded_iterable_shard_takes_every_item_once(n, world):
    shards = [list(ShardedIterable(range(n), r, world)) for r in range(world)]
    assert sorted(i for shard in shards for i in shard) == list(range(n))


def test_every_rank_gets_as_many_batches_of_an_iterable_dataset(model_factory, make_args, regression_data):
    # 9 samples over 2 processes, batch 2: rank 0 had 3 batches and rank 1 two; from then on rank 0 was a
    # step behind in each epoch, state.epoch differed, and a save or evaluation at an epoch's end hung
    from optsched import Trainer
    from optsched.trainer.distributed import DistributedContext

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter([dict(d, i=torch.tensor(i)) for i, d in enumerate(regression_data(9))])

    t = Trainer(model_factory(), make_args(per_device_train_batch_size=2, max_steps=4, remove_unused_columns=False),
                train_dataset=Stream())
    seen = []
    for rank in range(2):
        t.dist = DistributedContext(rank=rank, local_rank=rank, world_size=2)
        seen.append([int(i) for batch in t.get_train_dataloader() for i in batch["i"]])
    assert seen == [[0, 2, 4, 6, 8], [1, 3, 5, 7, 0]]  # sample 0 completes the last round, as a sampler pads


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), skip=st.integers(0, 40))
def test_sampler_skip_is_a_suffix_for_one_iteration(n, skip):
    s = EpochSampler(n, seed=3)
    full = list(s)
    s.set_skip(skip)
    assert list(s) == full[skip:]
    assert list(s) == full


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 50), ga=st.integers(1, 8))
def test_update_groups_sizes(n, ga):
    groups = list(iter_update_groups(iter(range(n)), ga))
    assert [x for g in groups for x in g] == list(range(n))
    assert all(len(g) == ga for g in groups[:-1]) and (not groups or 1 <= len(groups[-1]) <= ga)
    assert len(groups) == math.ceil(n / ga)


def test_split_inputs_and_label_count():
    x, y = torch.ones(2, 3), torch.tensor([1, -100])
    assert split_model_inputs({"x": x, "labels": y}, take_labels=False)[1].keys() == {"x", "labels"}
    args, kwargs, labels = split_model_inputs({"x": x, "labels": y}, take_labels=True)
    assert args == () and list(kwargs) == ["x"] and labels is y
    args, kwargs, labels = split_model_inputs((x, y), take_labels=True)
    assert args == (x,) and labels is y
    assert split_model_inputs([x, y], take_labels=False)[0] == (x, y)
    with pytest.raises(ValueError, match=r"batch of length 1 has no labels for the Trainer's loss \(compute_loss_func, or "):
        split_model_inputs((x,), take_labels=True)
    moved = move_to_device({"a": [x, (y,)], "b": 1}, torch.device("cpu"))
    assert moved["b"] == 1 and torch.equal(moved["a"][1][0], y)


@pytest.mark.parametrize("value", [0, 7, 2**40, 2.5, -1e-3])
def test_scalar_to_device_is_torch_tensor_of_the_value(value):
    # What `torch.tensor(value, device=device)` gives, value, dtype and device (on a GPU without the
    # host's stall: tests/trainer/test_trainer_cuda.py).
    got, expected = scalar_to_device(value, torch.device("cpu")), torch.tensor(value)
    assert (got.dtype, got.device, got.shape) == (expected.dtype, expected.device, torch.Size([]))
    assert got.item() == expected.item()


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 60), world=st.integers(1, 4), seed=st.integers(0, 2**31), epoch=st.integers(0, 5),
       drop_last=st.booleans(), shuffle=st.booleans())
def test_sampler_matches_torch_distributed_sampler(n, world, seed, epoch, drop_last, shuffle):
    from torch.utils.data.distributed import DistributedSampler

    for rank in range(world):
        ours = EpochSampler(n, seed=seed, shuffle=shuffle, rank=rank, world_size=world, drop_last=drop_last)
        ref = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=shuffle, seed=seed,
                                 drop_last=drop_last)
        ours.set_epoch(epoch)
        ref.set_epoch(epoch)
        assert list(ours) == list(ref)


@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 60), world=st.integers(1, 4), batch=st.integers(1, 5), drop_last=st.booleans())
def test_sampler_in_whole_batches_is_accelerates_batch_split(n, world, batch, drop_last):
    # group_by_length under DDP: transformers' Trainer batches one order and accelerate deals the batches
    # out in turn (BatchSamplerShard, even_batches: a short last round completed from the first batches)
    shard = pytest.importorskip("accelerate.data_loader").BatchSamplerShard
    order = torch.randperm(n, generator=torch.Generator().manual_seed(n)).tolist()
    for rank in range(world):
        ours = EpochSampler(n, seed=0, rank=rank, world_size=world, drop_last=drop_last and world > 1,
                            order=lambda epoch: order, shard_size=batch)
        loader = torch.utils.data.DataLoader(range(n), batch_size=batch, sampler=ours, drop_last=drop_last)
        batches = [b.tolist() for b in loader]
        reference = torch.utils.data.BatchSampler(order, batch, drop_last)
        if world > 1:  # transformers' Trainer on one process: the batch sampler as it is
            reference = shard(reference, num_processes=world, process_index=rank)
        assert batches == list(reference)
        assert len(loader) == len(batches)
