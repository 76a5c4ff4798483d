"""tf32 (optsched.trainer.tf32): transformers' check and TF32 setting, on torch's per-backend flags."""

from __future__ import annotations

import pytest
import torch

from optsched import Trainer, TrainingArguments
from optsched.trainer import tf32 as tf32_module
from trainer_helpers import PlainRegressor, make_trainer

transformers = pytest.importorskip("transformers")
training_args = pytest.importorskip("transformers.training_args")  # where TrainingArguments looks the check up

#: torch's per-backend float32 precisions (torch >= 2.9; "tf32" / "ieee" / "none", "none" inheriting).
_PRECISIONS = ("cuda.matmul", "cudnn", "cudnn.conv", "cudnn.rnn", "mkldnn", "mkldnn.matmul", "mkldnn.conv",
               "mkldnn.rnn")
HAS_PRECISION_API = hasattr(torch.backends, "fp32_precision")


def _backend(path: str):
    obj = torch.backends
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _snapshot() -> dict:
    """Every TF32 setting torch has (legacy flags read only when the new API was not used in between)."""
    if not HAS_PRECISION_API:
        return {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}
    return {"generic": torch.backends.fp32_precision, **{p: _backend(p).fp32_precision for p in _PRECISIONS}}


def _cuda_tf32() -> tuple[bool, bool, bool]:
    """Whether float32 CUDA matmuls, cuDNN convolutions and cuDNN RNNs may use TF32."""
    if not HAS_PRECISION_API:
        return (torch.backends.cuda.matmul.allow_tf32,) + (torch.backends.cudnn.allow_tf32,) * 2
    return tuple(_backend(p).fp32_precision == "tf32" for p in ("cuda.matmul", "cudnn.conv", "cudnn.rnn"))


def _set_legacy(matmul: bool, cudnn: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _reset(saved: dict) -> None:
    """Back to ``saved``: the legacy flags first (setting them writes the precisions too), then the precisions."""
    _set_legacy(*saved["legacy"])
    if HAS_PRECISION_API:
        torch.backends.fp32_precision = saved["generic"]
        for path in _PRECISIONS:
            _backend(path).fp32_precision = saved[path]


@pytest.fixture
def pristine():
    """TF32 settings are process-wide: the test starts from them and they are put back after it."""
    saved = {**_snapshot(), "legacy": (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)}
    yield saved
    _reset(saved)
    assert _snapshot() == _unchanged(saved) and torch.get_float32_matmul_precision()


def _unchanged(saved: dict) -> dict:
    return {k: v for k, v in saved.items() if k != "legacy"}


def _fields(tmp_path, name, **extra):
    return dict(output_dir=str(tmp_path / name), max_steps=1, save_strategy="no", disable_tqdm=True, use_cpu=True,
                **extra)


def _data():
    return [{"x": torch.ones(3), "labels": torch.zeros(())}] * 4


tf32_here = tf32_module.tf32_unavailable_reason() is None


@pytest.mark.skipif(tf32_here, reason="this process has a TF32 GPU")
def test_tf32_true_without_a_tf32_gpu_is_refused_as_transformers_refuses_it(tmp_path, pristine):
    with pytest.raises(ValueError, match="requires Ampere"):
        transformers.TrainingArguments(**_fields(tmp_path, "hf", tf32=True))
    args = TrainingArguments(**_fields(tmp_path, "optsched", tf32=True))  # arguments do not look at the hardware
    with pytest.raises(ValueError) as info:
        Trainer(PlainRegressor(), args, train_dataset=_data())
    message = str(info.value)
    assert "tf32=True needs an NVIDIA GPU of compute capability 8.0 or newer (Ampere)" in message
    assert tf32_module.tf32_unavailable_reason() in message and "accepted: tf32=None" in message
    assert _snapshot() == _unchanged(pristine)


@pytest.mark.skipif(tf32_here, reason="this process has a TF32 GPU")
@pytest.mark.parametrize("tf32", [False, None])
def test_tf32_false_or_none_without_a_tf32_gpu_changes_nothing_as_in_transformers(tmp_path, pristine, tf32):
    for name in ("hf", "optsched"):
        make_trainer(name, PlainRegressor(), _data(), **_fields(tmp_path, name, tf32=tf32))
        assert _snapshot() == _unchanged(pristine), name


@pytest.mark.skipif(not HAS_PRECISION_API, reason="torch < 2.9: transformers sets the legacy flags, as optsched")
@pytest.mark.parametrize("tf32", [True, False])
def test_on_a_tf32_gpu_cuda_gets_transformers_precision(tmp_path, monkeypatch, pristine, tf32):
    """The GPU check patched to pass, from torch's defaults: tf32=True gives float32 CUDA matmuls and cuDNN
    convolutions / RNNs TF32 with either Trainer, tf32=False takes it from the matmuls with either; on purpose
    optsched's takes it from cuDNN too, where transformers' generic "ieee" leaves torch's default (TF32 on)."""
    monkeypatch.setattr(training_args, "is_torch_tf32_available", lambda: True)
    monkeypatch.setattr(tf32_module, "tf32_unavailable_reason", lambda: None)
    training_args.enable_tf32.cache_clear()  # transformers caches each enable_tf32(value) call
    seen = {}
    for name in ("hf", "optsched"):
        _reset(pristine)
        make_trainer(name, PlainRegressor(), _data(), **_fields(tmp_path, name, tf32=tf32))
        seen[name] = _cuda_tf32()
    training_args.enable_tf32.cache_clear()
    assert seen["optsched"] == (tf32, tf32, tf32)
    assert seen["hf"] == (tf32, True, True)


@pytest.mark.skipif(not HAS_PRECISION_API, reason="torch < 2.9: transformers sets the legacy flags, as optsched")
def test_optsched_sets_the_cuda_flags_only_and_keeps_torch_readable(tmp_path, monkeypatch, pristine):
    """The deliberate differences: optsched leaves oneDNN's CPU precision alone and torch's precision queries
    working, and takes effect over a matmul flag set before; transformers' generic setting does neither."""
    monkeypatch.setattr(tf32_module, "tf32_unavailable_reason", lambda: None)
    for tf32 in (True, False):
        _reset(pristine)
        _set_legacy(not tf32, not tf32)  # set the other way before the Trainer
        make_trainer("optsched", PlainRegressor(), _data(), **_fields(tmp_path, "optsched", tf32=tf32))
        assert _cuda_tf32() == (tf32, tf32, tf32)
        assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32
        assert torch.get_float32_matmul_precision() == ("high" if tf32 else "highest")
        assert {p: _backend(p).fp32_precision for p in _PRECISIONS if p.startswith("mkldnn")} == {
            p: pristine[p] for p in _PRECISIONS if p.startswith("mkldnn")}
    # transformers 5.23 on torch >= 2.9: torch.backends.fp32_precision = "tf32"
    monkeypatch.setattr(training_args, "is_torch_tf32_available", lambda: True)
    training_args.enable_tf32.cache_clear()
    _reset(pristine)
    _set_legacy(False, False)
    make_trainer("hf", PlainRegressor(), _data(), **_fields(tmp_path, "hf", tf32=True))
    training_args.enable_tf32.cache_clear()
    assert torch.backends.mkldnn.fp32_precision == "tf32"
    assert torch.backends.cuda.matmul.fp32_precision == "ieee"  # the matmul flag set before wins
    with pytest.raises(RuntimeError, match="mix of the legacy and new APIs"):
        torch.get_float32_matmul_precision()


@pytest.mark.parametrize(("cuda", "available", "capability", "reason"), [
    (None, False, None, "this torch build ("),  # a CPU or ROCm build
    ("12.8", False, None, "no CUDA device is available"),
    ("12.8", True, (7, 0), "the GPU (Tesla V100) has compute capability 7.0"),
    ("12.8", True, (8, 0), None),
    ("12.8", True, (9, 0), None),
])
def test_the_gpu_check_is_transformers_is_torch_tf32_available(monkeypatch, cuda, available, capability, reason):
    monkeypatch.setattr(torch.version, "cuda", cuda)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: type(
        "Properties", (), {"major": capability[0], "minor": capability[1]}))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    got = tf32_module.tf32_unavailable_reason()
    assert (got is None) is (reason is None) and (reason is None or got.startswith(reason))
    assert transformers.utils.import_utils.is_torch_tf32_available.__wrapped__() is (reason is None)  # uncached
