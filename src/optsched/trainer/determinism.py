"""Seeding, and ``full_determinism``: transformers' ``set_seed`` / ``enable_full_determinism``.

The Trainer seeds the process when it is built, as transformers' does: :func:`set_seed`, or with
``full_determinism=True`` :func:`enable_full_determinism`, which seeds the same way and then switches torch
to deterministic kernels. Everything it sets is process-wide and stays set after the Trainer is gone (as
in transformers): torch's flags, cuDNN's, and environment variables, some of which CUDA reads only when it
initialises (``CUDA_LAUNCH_BLOCKING``; cuBLAS reads ``CUBLAS_WORKSPACE_CONFIG`` when it creates a handle),
so they take full effect only when the Trainer is built before the process first uses the GPU.
"""

from __future__ import annotations

import os
import random

import torch

__all__ = ["FULL_DETERMINISM_ENVIRONMENT", "enable_full_determinism", "set_seed"]

#: The environment transformers 5.23's ``enable_full_determinism`` sets, copied as it is: cuBLAS's
#: deterministic workspace (CUDA >= 10.2) and synchronous kernel launches (CUDA 10.1), Ascend NPUs' and HCCL's
#: equivalents, and flash-attention's deterministic backward (read by transformers' integration).
FULL_DETERMINISM_ENVIRONMENT: dict[str, str] = {
    "CUDA_LAUNCH_BLOCKING": "1",
    "CUBLAS_WORKSPACE_CONFIG": ":16:8",
    "ASCEND_LAUNCH_BLOCKING": "1",
    "HCCL_DETERMINISTIC": "1",
    "FLASH_ATTENTION_DETERMINISTIC": "1",
}


def set_seed(seed: int) -> None:
    """Seed python, numpy (when installed), torch and CUDA (``torch.manual_seed`` seeds every device)."""
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # numpy is optional
        pass
    torch.manual_seed(seed)


def enable_full_determinism(seed: int, warn_only: bool = False) -> None:
    """:func:`set_seed`, then deterministic torch, process-wide (transformers' function, step for step).

    Sets :data:`FULL_DETERMINISM_ENVIRONMENT` in ``os.environ`` (overwriting values already there),
    ``torch.use_deterministic_algorithms(True, warn_only=warn_only)`` (an operation without a deterministic
    implementation then raises ``RuntimeError``, or warns with ``warn_only``),
    ``torch.backends.cudnn.deterministic = True`` and ``torch.backends.cudnn.benchmark = False``. Nothing is
    undone afterwards.
    """
    set_seed(seed)
    os.environ.update(FULL_DETERMINISM_ENVIRONMENT)
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
