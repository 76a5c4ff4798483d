"""``tf32``: TensorFloat-32 for float32 CUDA matmuls and cuDNN convolutions, as transformers sets it.

transformers 5.23's ``TrainingArguments`` (its ``__post_init__``), for ``tf32`` not None: ``True`` turns TF32
on when the process has an NVIDIA GPU of compute capability 8.0 or more (Ampere and newer) and a CUDA build
of torch, and raises ``ValueError`` otherwise (on a CPU, a ROCm build, a V100); ``False`` turns it off on
such a GPU and does nothing elsewhere (there is nothing to turn off); ``None`` leaves torch's setting.
:func:`apply_tf32` does the same when the Trainer is built (optsched's ``TrainingArguments`` do not look
at the hardware, so they can be written on a machine without the GPU). The setting is process-wide and
stays after the Trainer is gone, as in transformers.

Differences from transformers, on purpose:

* The flags set are torch's ``torch.backends.cuda.matmul.allow_tf32`` and ``torch.backends.cudnn.allow_tf32``
  (transformers' own choice before torch 2.9). From torch 2.9 transformers sets the generic
  ``torch.backends.fp32_precision`` instead, which also switches oneDNN's CPU matmuls and convolutions to TF32
  (``torch.backends.mkldnn``), and after which torch refuses to read the older flags:
  ``torch.backends.cuda.matmul.allow_tf32`` and ``torch.get_float32_matmul_precision()`` (which inductor's
  autotuning cache reads) raise ``RuntimeError`` for the rest of the process. The CUDA matmuls and cuDNN
  convolutions / RNNs get the same precision either way (``torch.backends.cuda.matmul.fp32_precision`` and
  ``torch.backends.cudnn.conv.fp32_precision`` read ``"tf32"`` after ``tf32=True``, and not after ``False``).
* transformers caches its ``enable_tf32(value)`` calls, so a second ``TrainingArguments(tf32=True)`` after
  the flags were switched off by hand leaves them off; here each Trainer sets them.
* ``torch_compile=True`` with ``tf32`` unset does not turn TF32 on (see :mod:`optsched.trainer.compile`).
"""

from __future__ import annotations

import torch

__all__ = ["apply_tf32", "tf32_unavailable_reason"]


def tf32_unavailable_reason() -> str | None:
    """Why this process cannot use TF32 (transformers' ``is_torch_tf32_available`` rule, for the current
    CUDA device), or ``None`` when it can."""
    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    device = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"the GPU ({torch.cuda.get_device_name(device)}) has compute capability {major}.{minor}"
    return None


def apply_tf32(tf32: bool | None) -> None:
    """Set TF32 for float32 CUDA matmuls and cuDNN convolutions to ``tf32``, process-wide.

    Args:
        tf32: ``True`` / ``False`` set ``torch.backends.cuda.matmul.allow_tf32`` and
            ``torch.backends.cudnn.allow_tf32``; ``None`` leaves them. ``False`` without a TF32-capable GPU
            does nothing.

    Raises:
        ValueError: ``tf32=True`` without an NVIDIA GPU of compute capability 8.0 or more and a CUDA build
            of torch (transformers raises too).
    """
    if tf32 is None:
        return
    reason = tf32_unavailable_reason()
    if reason is not None:
        if tf32:
            raise ValueError(
                f"tf32=True needs an NVIDIA GPU of compute capability 8.0 or newer (Ampere) and a CUDA build of "
                f"torch, but {reason}; accepted: tf32=None (torch's setting) or tf32=False, or a run on such a GPU."
            )
        return  # no TF32 to turn off
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
