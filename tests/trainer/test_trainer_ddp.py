"""DDP: 2 processes x batch 4 (gloo, CPU) follow the same loss trajectory as 1 process x batch 8."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from trainer_helpers import run_torchrun

HERE = Path(__file__).parent


def _run_ddp_worker(out: Path, *mode: str) -> dict:
    """ddp_worker.py under torchrun, 2 processes (gloo): rank 0's ddp_result.json."""
    run_torchrun("ddp_worker.py", str(out), *mode)
    return json.loads((out / "ddp_result.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("tokens", [False, True], ids=["mean-loss", "num-items-in-batch"])
def test_two_processes_match_one_process_with_double_batch(tmp_path, tokens):
    # tokens: the model divides its summed loss by num_items_in_batch, counted over both processes
    # (average_tokens_across_devices), and the ranks of a step hold different numbers of labels: each
    # label weighs the same as in one process only if the count is global and the loss x 2 undoes DDP's mean
    sys.path.insert(0, str(HERE))
    from ddp_worker import DDP_STEPS, result, run

    ddp = _run_ddp_worker(tmp_path / "ddp", *(["tokens"] if tokens else []))

    single = result(run(str(tmp_path / "single"), batch_size=8, tokens=tokens))
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    assert len(ddp["losses"]) == DDP_STEPS
    torch.testing.assert_close(torch.tensor(ddp["losses"]), torch.tensor(single["losses"]), rtol=1e-5, atol=1e-6)
    assert ddp["lrs"] == single["lrs"]
    # summed over both processes: 6 x 4 features x 97 parameters per sample, 8 samples a step
    assert ddp["total_flos"] == single["total_flos"] == 6 * 4 * 97 * 8 * DDP_STEPS
    # include_num_input_tokens_seen="all": 4 elements of x per sample, summed over both processes
    assert ddp["tokens_seen"] == single["tokens_seen"] == 4 * 8 * DDP_STEPS
    for name, values in single["weights"].items():
        torch.testing.assert_close(torch.tensor(ddp["weights"][name]), torch.tensor(values), rtol=1e-4, atol=1e-6)
    # rank 0 wrote the checkpoint, each rank its RNG state
    assert {"rng_state_0.pth", "rng_state_1.pth", "model.safetensors", "optimizer.pt"} <= set(ddp["files"])
    assert "rng_state.pth" in single["files"]


@pytest.mark.slow
def test_group_by_length_gives_each_process_transformers_batches(tmp_path):
    # ddp_grouping_worker.py: 23 samples of 2 to 11 tokens, 2 processes x batch 2, GA 2, 2 epochs; both
    # Trainers in each process. transformers' batches one length-grouped order (megabatches of batch x GA)
    # and accelerate deals the batches to the processes in turn, the last round completed from the first
    pytest.importorskip("transformers")
    sys.path.insert(0, str(HERE))
    from trainer_helpers import varied_length_data

    run_torchrun("ddp_grouping_worker.py", str(tmp_path))
    ranks = [json.loads((tmp_path / f"batches_{rank}.json").read_text()) for rank in (0, 1)]
    for rank in ranks:
        assert len(rank["optsched"]["batches"]) == 12 and rank["optsched"]["batches"] == rank["hf"]["batches"]
        for name, values in rank["hf"]["weights"].items():  # the same steps, summed over the processes
            torch.testing.assert_close(torch.tensor(rank["optsched"]["weights"][name]), torch.tensor(values))
    lengths = [len(x["input_ids"]) for x in varied_length_data()]
    for epoch in (0, 1):
        batches = [rank["optsched"]["batches"][6 * epoch + i] for i in range(6) for rank in ranks]  # dealt in turn
        order = [i for batch in batches for i in batch]
        assert sorted(set(order)) == list(range(23)) and order[23] == order[0]  # each sample, + 1 to even out
        for start in range(0, 20, 4):  # each megabatch of 4, longest first (the longest sample at the front)
            chunk = [lengths[i] for i in order[start:start + 4]]
            assert chunk[1:] == sorted(chunk[1:], reverse=True)


def test_torch_compile_under_ddp_compiles_the_ddp_wrapper(tmp_path):
    # accelerate's order, torch.compile(DDP(model)), 2 processes with gradient accumulation 2 (eager
    # backend): the uncompiled DDP run bitwise, one all-reduce per optimizer step (no_sync found inside the
    # compiled wrapper: 2 per step otherwise), and the checkpoint under the model's own names
    from safetensors import safe_open

    sys.path.insert(0, str(HERE))
    from ddp_worker import DDP_STEPS

    out = tmp_path / "ddp"
    compiled = _run_ddp_worker(out, "compile")
    plain = compiled.pop("uncompiled")
    assert compiled["wrapped"] == ["OptimizedModule", "DistributedDataParallel", "RegressorWithAnUnusedLayer"]
    assert plain["wrapped"] == ["DistributedDataParallel", "RegressorWithAnUnusedLayer"]
    assert compiled["all_reduces"] == plain["all_reduces"] == DDP_STEPS
    assert compiled["losses"] == plain["losses"] and compiled["weights"] == plain["weights"]
    with safe_open(str(out / f"checkpoint-{DDP_STEPS}" / "model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted(plain["weights"])


def test_every_process_loads_the_best_checkpoint(tmp_path):
    # load_best_model_at_end under 2 processes: process 0 wrote checkpoint-2, each process reads it after a
    # barrier; the weights are the same on both and are that checkpoint's, not the last step's
    from safetensors.torch import load_file

    out = tmp_path / "ddp"
    run_torchrun("ddp_worker.py", str(out), "best")
    ranks = [json.loads((out / f"ddp_result_{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0]["best"] == ranks[1]["best"] == str(out / "checkpoint-2")
    assert ranks[0]["weights"] == ranks[1]["weights"]
    best, last = (load_file(str(out / name / "model.safetensors")) for name in ("checkpoint-2", "checkpoint-6"))
    for name, values in ranks[0]["weights"].items():
        assert torch.equal(torch.tensor(values), best[name].flatten()), name
    assert any(not torch.equal(best[name], last[name]) for name in best)


# ---- DDP's keyword arguments (no process group needed) --------------------------------------------


def _tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, vocab_size=50)
    return transformers.BertForSequenceClassification(config)


def _transformers_ddp_kwargs(model, tmp_path, **fields) -> dict:
    """What transformers' Trainer hands accelerate for DDP (its ``_build_accelerator_args``)."""
    import transformers

    if not hasattr(transformers.Trainer, "_build_accelerator_args"):  # private: 5.x builds DDP's kwargs there
        pytest.skip(f"transformers {transformers.__version__} builds DDP's kwargs elsewhere")
    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **fields)
    trainer = transformers.Trainer(model=model, args=args)
    handler = trainer._build_accelerator_args()["kwargs_handlers"][0]
    return handler.to_kwargs() | {"find_unused_parameters": handler.find_unused_parameters}


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize(
    "fields",
    [{}, {"ddp_find_unused_parameters": False}, {"ddp_find_unused_parameters": True},
     {"ddp_broadcast_buffers": False, "ddp_bucket_cap_mb": 50, "ddp_static_graph": True}],
    ids=["defaults", "find-false", "find-true", "buffers-bucket-static"],
)
@pytest.mark.parametrize("kind", ["plain", "transformers"])
def test_ddp_kwargs_are_transformers(tmp_path, kind, checkpointing, fields):
    from optsched import TrainingArguments
    from optsched.trainer.distributed import ddp_kwargs

    if kind == "plain":
        from trainer_helpers import TinyRegressor

        model = TinyRegressor()
        if checkpointing:  # a user's flag of the same name on a plain module: transformers ignores it
            model.inp.gradient_checkpointing = True
    else:
        model = _tiny_bert()
        if checkpointing:
            # transformers 5 renamed it; 4.x has gradient_checkpointing_enable only
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
    ours = ddp_kwargs(model, TrainingArguments(output_dir=str(tmp_path), **fields))
    theirs = _transformers_ddp_kwargs(model, tmp_path, **fields)
    expected_find = fields.get("ddp_find_unused_parameters", not (kind == "transformers" and checkpointing))
    assert ours["find_unused_parameters"] is expected_find
    assert ours == {k: v for k, v in theirs.items() if k in ours}
    # what optsched leaves to DDP's own defaults, transformers does too (accelerate drops default values)
    assert set(theirs) - set(ours) <= {"find_unused_parameters"}


def test_ddp_kwargs_without_args_find_unused_parameters():
    from optsched.trainer.distributed import ddp_kwargs

    assert ddp_kwargs(torch.nn.Linear(2, 2)) == {"find_unused_parameters": True}


# ---- ddp_backend, ddp_timeout (the process group's start; no process group needed) -------------------


def test_ddp_backend_and_timeout_start_the_process_group(monkeypatch):
    import datetime

    import torch.distributed as dist

    from optsched.trainer.distributed import init_distributed

    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: calls.append(kwargs))
    env = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}
    ctx = init_distributed(use_cpu=True, env=env, backend="gloo", timeout_s=90)
    assert (ctx.rank, ctx.world_size) == (1, 2)
    assert calls == [{"backend": "gloo", "rank": 1, "world_size": 2, "timeout": datetime.timedelta(seconds=90)}]
    init_distributed(use_cpu=True, env=env)  # the defaults: gloo on the CPU, torch's timeout
    assert calls[1] == {"backend": "gloo", "rank": 1, "world_size": 2, "timeout": None}
    monkeypatch.setattr(dist, "is_backend_available", lambda name: name == "gloo")
    with pytest.raises(ValueError, match=r"ddp_backend='mpi' is not available in this torch build; accepted: gloo"):
        init_distributed(use_cpu=True, env=env, backend="mpi")


def test_the_trainer_passes_ddp_backend_and_timeout(monkeypatch, tmp_path):
    from optsched import Trainer, TrainingArguments
    from optsched.trainer import trainer as trainer_module
    from optsched.trainer.distributed import DistributedContext

    seen = []

    def fake_init(use_cpu=False, env=None, *, backend=None, timeout_s=None):
        seen.append((backend, timeout_s))
        return DistributedContext(rank=0, local_rank=0, world_size=1)

    monkeypatch.setattr(trainer_module, "init_distributed", fake_init)
    Trainer(torch.nn.Linear(2, 1), TrainingArguments(output_dir=str(tmp_path), use_cpu=True))
    Trainer(torch.nn.Linear(2, 1), TrainingArguments(output_dir=str(tmp_path), use_cpu=True, ddp_backend="gloo",
                                                     ddp_timeout=60))
    assert seen == [(None, 1800), ("gloo", 60)]
    with pytest.raises(ValueError, match=r"ddp_backend='glo'.*gloo"):
        TrainingArguments(ddp_backend="glo")
    with pytest.raises(ValueError, match="ddp_timeout"):
        TrainingArguments(ddp_timeout=0)
