"""Every optimizer name on a CUDA GPU: skipped where there is none (CI), run on a lent GPU with
``CUDA_VISIBLE_DEVICES=0 python -m pytest tests/optim/test_optim_cuda.py tests/trainer/test_trainer_cuda.py``
(``tests/conftest.py`` hides GPUs unless the variable is set).

The CPU tests (``test_optim_registry_wide.py``) leave out the CUDA-only names (``adalomo``, GaLore's 8-bit
variants) and run bitsandbytes' optimizers on its CPU backend; here each registered name that can run on
CUDA lowers the same quadratic and round-trips its state, on the GPU.
"""

from __future__ import annotations

import pytest
import torch
from _optim_helpers import make_quadratic
from test_optim_registry_wide import _args, _importable, assert_trains_and_round_trips

from optsched.optim import create_optimizer, get_optimizer_spec, list_optimizers
from optsched.optim.adafactor import Adafactor

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Packages for other accelerators (XLA, Ascend) and torchdistx, which has no wheel for current torch.
NOT_ON_CUDA = {"adamw_torch_xla", "adamw_torch_npu_fused", "adamw_anyprecision"}
ON_CUDA = [n for n in list_optimizers() if n not in NOT_ON_CUDA and _importable(get_optimizer_spec(n))]


@pytest.mark.parametrize("name", ON_CUDA)
def test_lowers_loss_and_state_dict_round_trips_on_cuda(name):
    assert_trains_and_round_trips(name, "cuda")


def test_default_optimizer_is_torch_fused_adamw_on_cuda():
    from optsched.arguments import DEFAULT_OPTIM

    optimizer = create_optimizer(make_quadratic().cuda(), _args(DEFAULT_OPTIM))
    assert optimizer.defaults.get("fused") is (DEFAULT_OPTIM == "adamw_torch_fused")


def test_adafactor_on_cuda_follows_the_cpu_step():
    shapes = [(64, 48), (48,), (3, 5, 7)]  # factored matrix, vector, 3-d (factored over the last two)
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(10)]
    results = {}
    for device in ("cpu", "cuda"):
        params = [torch.nn.Parameter(t.to(device, torch.float64)) for t in start]
        opt = Adafactor(params, lr=1e-2, scale_parameter=False, relative_step=False)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.to(device, torch.float64)
            opt.step()
        results[device] = [p.detach().cpu() for p in params]
    for a, b in zip(results["cpu"], results["cuda"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)  # float64: only summation order differs


def test_adafactor_fused_refuses_a_gpu_parameter_with_the_eager_path_named():
    with pytest.raises(ValueError, match="fused=False"):
        Adafactor([torch.nn.Parameter(torch.zeros(4, 4, device="cuda"))], lr=1e-3, fused=True,
                  scale_parameter=False, relative_step=False)
