"""The Trainer on a CUDA GPU: skipped where there is none (CI); see ``tests/optim/test_optim_cuda.py`` for
how to run it on a lent GPU.

What only a GPU exercises: the model and batches moved to ``cuda`` (from pinned memory), bf16 autocast
and fp16 with a ``GradScaler`` on the device, the CUDA RNG state in checkpoints (exact resume with
dropout), a GPU checkpoint resumed on the CPU, and the GPU memory metrics.
"""

from __future__ import annotations

import math

import pytest
import torch
from trainer_helpers import TinyRegressor

from optsched import Trainer, TrainerCallback
from optsched.demo import build_dataset, build_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class _ParameterDevices(TrainerCallback):
    """Records the device of every parameter at each step's end."""

    def __init__(self, model) -> None:
        self.model = model
        self.devices: set[str] = set()

    def on_step_end(self, args, state, control, **kwargs):
        self.devices |= {p.device.type for p in self.model.parameters()}


def _demo(make_args, **fields):
    torch.manual_seed(0)
    model = build_model()
    args = make_args(max_steps=30, per_device_train_batch_size=16, learning_rate=3e-3, use_cpu=False, **fields)
    return Trainer(model, args, train_dataset=build_dataset(256, seed=0), eval_dataset=build_dataset(64, seed=1))


@pytest.mark.parametrize("precision", [{}, {"bf16": True}, {"fp16": True}])
def test_trains_evaluates_and_predicts_on_the_gpu(make_args, precision):
    trainer = _demo(make_args, **precision)
    seen = _ParameterDevices(trainer.model)
    trainer.add_callback(seen)
    assert trainer.device.type == "cuda"
    result = trainer.train()
    assert seen.devices == {"cuda"}
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert math.isfinite(result.training_loss) and losses[-1] < losses[0]
    assert all(math.isfinite(h["grad_norm"]) for h in trainer.state.log_history if "grad_norm" in h)
    assert (trainer.scaler is not None) == bool(precision.get("fp16"))
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"])
    predictions = trainer.predict(build_dataset(8, seed=2))
    assert predictions.predictions.shape == (8, 2)  # gathered to the host as numpy
    assert type(predictions.predictions).__module__ == "numpy"


def test_the_label_count_reaches_the_gpu_without_a_stall():
    # num_items_in_batch is sent to the device at every step: a pageable copy would stall the host until
    # the GPU had run all it was given (torch's sync debug mode calls that an error); the staged copy does not.
    from optsched.trainer.data import scalar_to_device

    device = torch.device("cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            torch.tensor(12, device=device)  # the check can fail: the plain copy is caught
        counts = [scalar_to_device(n, device) for n in (12, 3)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [c.item() for c in counts] == [12, 3] and counts[0].dtype == torch.int64


def test_gpu_memory_metrics_are_reported(make_args):
    trainer = _demo(make_args, skip_memory_metrics=False)
    metrics = trainer.train().metrics
    assert "train_mem_gpu_alloc_delta" in metrics and "train_mem_gpu_peaked_delta" in metrics
    assert metrics["before_init_mem_gpu"] >= 0


@pytest.mark.parametrize("setup", [{}, {"fp16": True}, {"optim": "adalomo"}])
def test_straight_vs_resumed_on_the_gpu_is_bitwise_identical(regression_data, make_args, setup):
    # dropout draws from the CUDA generator: its state must travel in rng_state.pth. AdaLomo (CUDA only)
    # kept its moments outside its state dict until optsched.optim.adalomo.
    data = regression_data(36)
    args = dict(max_steps=12, save_strategy="steps", save_steps=5, warmup_steps=2, lr_scheduler_type="cosine",
                use_cpu=False, **setup)
    runs = []
    for resume in (None, "checkpoint-5"):
        torch.manual_seed(0)
        trainer = Trainer(TinyRegressor(dropout=0.3), make_args(**args), train_dataset=data)
        trainer.train(resume_from_checkpoint=resume and f"{trainer.args.output_dir}/{resume}")
        runs.append(trainer)
    straight, resumed = runs
    saved = torch.load(f"{straight.args.output_dir}/checkpoint-5/rng_state.pth", weights_only=False)
    assert "cuda" in saved
    for (n, p), (_, q) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert p.is_cuda and torch.equal(p, q), n
    if setup.get("fp16"):
        assert resumed.scaler.get_scale() == straight.scaler.get_scale()


def test_a_gpu_checkpoint_resumes_on_the_cpu(regression_data, make_args):
    data = regression_data(16)
    common = dict(max_steps=6, save_strategy="steps", save_steps=3)
    gpu = Trainer(TinyRegressor(), make_args(use_cpu=False, **common), train_dataset=data)
    gpu.train()
    cpu = Trainer(TinyRegressor(), make_args(use_cpu=True, **common), train_dataset=data)
    cpu.train(resume_from_checkpoint=f"{gpu.args.output_dir}/checkpoint-3")
    assert cpu.state.global_step == 6
    assert all(not p.is_cuda for p in cpu.model.parameters())
    assert all(not v.is_cuda for s in cpu.optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    for (n, p), (_, q) in zip(gpu.model.named_parameters(), cpu.model.named_parameters()):
        torch.testing.assert_close(p.cpu(), q, rtol=1e-5, atol=1e-6, msg=n)  # CPU and GPU kernels round apart
