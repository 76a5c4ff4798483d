"""A fused CPU kernel for Adafactor's matrix update: ``Adafactor(..., fused=True)``, opt-in.

The eager step (:class:`optsched.optim.adafactor.Adafactor`) makes, per matrix, two passes over the
gradient and one over the parameter from memory, plus five passes over a cache-resident workspace
(``g**2``, its row sums, one GEMM for the column sums and the update's norm, ``g * rsqrt(col)``,
the update); those cache passes and the small ops around them are most of its time on CPU
(BENCHMARKS.md). Here each matrix takes two passes and nothing else:

* ``stats``: one pass over ``g`` (and ``p``, when ``scale_parameter`` needs its RMS). Row by row: the
  row's sum of squares, so its new second moment ``row_i`` at once, then, from the row still in L1,
  ``colsum_j += g_ij**2`` and ``v_j += g_ij**2 / row_i``. After the last row: the new column moment
  ``col_j``, and the update's squared norm without a second pass, since
  ``||u||**2 = sum_ij g_ij**2 r_i**2 / col_j`` with ``r_i**2 = mean(row) / row_i`` is
  ``mean(row) * sum_j v_j / col_j``.
* ``update``: ``p_ij <- p_ij + d * p_ij - a_i * c_j * g_ij`` with ``a_i = scale * rsqrt(row_i)``,
  ``c_j = rsqrt(col_j)``, ``d = -weight_decay * lr_t`` (transformers' order of operations); with
  ``beta1`` the update goes through the first moment first (``update_momentum``, torch's ``lerp``).

Same formulas and state as the eager path, summed in another order: results agree to ~1e-6 relative
(tests/optim/test_adafactor_fused.py). Rows are split over torch's intra-op threads.

The kernel is C++ compiled on first use with ``torch.utils.cpp_extension.load_inline`` (a C++
compiler and ``ninja``; ~20 s once, then cached under ``TORCH_EXTENSIONS_DIR``), for the CPU's vector
width as torch reports it (``torch.backends.cpu.get_cpu_capability()``: the cache key includes it, so
a home directory shared by different machines gets one build per kind). Nothing is compiled unless
``fused=True`` is asked for.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
from typing import Any

import torch
from torch import Tensor

__all__ = ["eligible", "load_kernels", "missing_build_tool"]

logger = logging.getLogger(__name__)

_VERSION = 1  # part of the extension's name: bump when the source changes

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>

static void check_matrix(const at::Tensor& t, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
              name, " must be a contiguous float32 CPU tensor");
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, name, " has the wrong shape");
}

static void check_vector(const at::Tensor& t, const char* name, int64_t n) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == n,
              name, " must be a contiguous float32 CPU tensor of ", n, " values");
}

// Returns {||u||^2 before clipping, ||p||^2 (0 unless want_p), mean of the new row moments}; updates
// row and col in place: x <- beta2t * x + (1 - beta2t) * (mean of g^2 + eps1).
std::vector<double> stats(const at::Tensor& g, const at::Tensor& p, at::Tensor row, at::Tensor col,
                          double beta2t, double eps1, bool want_p) {
  const int64_t R = g.size(0), C = g.size(1);
  check_matrix(g, "grad", R, C);
  if (want_p) check_matrix(p, "param", R, C);
  check_vector(row, "exp_avg_sq_row", R);
  check_vector(col, "exp_avg_sq_col", C);
  const float* G = g.data_ptr<float>();
  const float* P = want_p ? p.data_ptr<float>() : nullptr;
  float* rw = row.data_ptr<float>();
  float* cl = col.data_ptr<float>();
  const float b = (float)beta2t, rho = (float)(1.0 - beta2t), e = (float)eps1;
  const int64_t T = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), R));
  std::vector<float> cs(T * C, 0.f), v(T * C, 0.f);
  std::vector<double> psq(T, 0.0), rsum(T, 0.0);
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* csp = cs.data() + t * C;
      float* vp = v.data() + t * C;
      for (int64_t i = R * t / T; i < R * (t + 1) / T; ++i) {
        const float* gi = G + i * C;
        float rs = 0.f;
#pragma omp simd reduction(+ : rs)
        for (int64_t j = 0; j < C; ++j) rs += gi[j] * gi[j];
        const float rnew = b * rw[i] + rho * (rs / (float)C + e);
        rw[i] = rnew;
        rsum[t] += rnew;
        const float inv = 1.f / rnew;
#pragma omp simd
        for (int64_t j = 0; j < C; ++j) {
          const float s = gi[j] * gi[j];
          csp[j] += s;
          vp[j] += s * inv;
        }
        if (P != nullptr) {
          const float* pi = P + i * C;
          float ps = 0.f;
#pragma omp simd reduction(+ : ps)
          for (int64_t j = 0; j < C; ++j) ps += pi[j] * pi[j];
          psq[t] += ps;
        }
      }
    }
  });
  double p_sq = 0.0, row_sum = 0.0, w = 0.0;
  for (int64_t t = 0; t < T; ++t) { p_sq += psq[t]; row_sum += rsum[t]; }
  for (int64_t j = 0; j < C; ++j) {
    float colsum = 0.f, vj = 0.f;
    for (int64_t t = 0; t < T; ++t) { colsum += cs[t * C + j]; vj += v[t * C + j]; }
    const float cnew = b * cl[j] + rho * (colsum / (float)R + e);
    cl[j] = cnew;
    w += (double)vj / (double)cnew;
  }
  const double row_mean = row_sum / (double)R;
  return {row_mean * w, p_sq, row_mean};
}

static std::vector<float> col_factors(const at::Tensor& col) {
  const float* cl = col.data_ptr<float>();
  std::vector<float> c(col.numel());
  for (int64_t j = 0; j < col.numel(); ++j) c[j] = 1.f / std::sqrt(cl[j]);
  return c;
}

// p <- p + decay * p - a_i c_j g_ij, a_i = scale / sqrt(row_i), c_j = 1 / sqrt(col_j).
// The checks of update / update_momentum; returns the column factors 1 / sqrt(col_j).
static std::vector<float> check_update(const at::Tensor& p, const at::Tensor& g, const at::Tensor& row,
                                       const at::Tensor& col) {
  check_matrix(g, "grad", g.size(0), g.size(1));
  check_matrix(p, "param", g.size(0), g.size(1));
  check_vector(row, "exp_avg_sq_row", g.size(0));
  check_vector(col, "exp_avg_sq_col", g.size(1));
  return col_factors(col);
}

void update(at::Tensor p, const at::Tensor& g, const at::Tensor& row, const at::Tensor& col,
            double scale, double decay) {
  const int64_t R = g.size(0), C = g.size(1);
  const std::vector<float> c = check_update(p, g, row, col);
  float* P = p.data_ptr<float>();
  const float* G = g.data_ptr<float>();
  const float* rw = row.data_ptr<float>();
  const float d = (float)decay;
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      const float a = (float)scale / std::sqrt(rw[i]);
      float* pi = P + i * C;
      const float* gi = G + i * C;
      const float* cp = c.data();
      if (d != 0.f) {
#pragma omp simd
        for (int64_t j = 0; j < C; ++j) { const float t = pi[j] + d * pi[j]; pi[j] = t - a * cp[j] * gi[j]; }
      } else {
#pragma omp simd
        for (int64_t j = 0; j < C; ++j) pi[j] -= a * cp[j] * gi[j];
      }
    }
  });
}

// As update, through the first moment: m <- lerp(m, a_i c_j g_ij, 1 - beta1) (torch's lerp), p <- p + decay * p - m.
void update_momentum(at::Tensor p, const at::Tensor& g, const at::Tensor& row, const at::Tensor& col,
                     at::Tensor exp_avg, double scale, double decay, double beta1) {
  const int64_t R = g.size(0), C = g.size(1);
  const std::vector<float> c = check_update(p, g, row, col);
  check_matrix(exp_avg, "exp_avg", R, C);
  float* P = p.data_ptr<float>();
  float* M = exp_avg.data_ptr<float>();
  const float* G = g.data_ptr<float>();
  const float* rw = row.data_ptr<float>();
  const float d = (float)decay, w = (float)(1.0 - beta1);
  const bool low = std::abs(w) < 0.5f;
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      const float a = (float)scale / std::sqrt(rw[i]);
      float* pi = P + i * C;
      float* mi = M + i * C;
      const float* gi = G + i * C;
      const float* cp = c.data();
#pragma omp simd
      for (int64_t j = 0; j < C; ++j) {
        const float u = a * cp[j] * gi[j];
        const float m = low ? mi[j] + w * (u - mi[j]) : u - (u - mi[j]) * (1.f - w);
        mi[j] = m;
        pi[j] = (pi[j] + d * pi[j]) - m;
      }
    }
  });
}
"""

# torch.backends.cpu.get_cpu_capability() -> the compiler flags of that vector width (x86 only; any
# other answer builds for the compiler's default target).
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq", "-mavx2", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}


def _build_flags(capability: str) -> tuple[list[str], list[str]]:
    """``(compile flags, link flags)`` for this platform: OpenMP where the compiler takes ``-fopenmp``
    (Linux; without it ``at::parallel_for`` runs the rows on one thread, with the same results), MSVC's
    spelling on Windows."""
    if sys.platform == "win32":
        return ["/O2"], []
    isa = _ISA_FLAGS.get(capability, [])
    if sys.platform == "darwin":  # Apple's clang has no -fopenmp
        return ["-O3", *isa], []
    return ["-O3", "-fopenmp", *isa], ["-fopenmp"]


def _capability() -> str:
    get = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)
    return str(get()) if get is not None else "DEFAULT"


def missing_build_tool() -> str | None:
    """What this machine lacks to build the kernel (no C++ compiler, no ninja), or ``None``: the check
    :func:`load_kernels` makes first, for callers that skip ``fused=True`` where it cannot be built."""
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "cl" if sys.platform == "win32" else "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler {compiler!r} was found (set CXX or install g++/clang++)"
    if not cpp_extension.is_ninja_available():
        return "ninja, which it builds with, is not installed (pip install ninja)"
    return None


@functools.lru_cache(maxsize=None)
def load_kernels() -> Any:
    """Build (first call on a machine: ~20 s) and load the kernels; later calls return the same module.

    Returns:
        A module with ``stats``, ``update`` and ``update_momentum`` (see the module docstring).

    Raises:
        ImportError: no C++ compiler, no ``ninja``, or the build failed; the message says what is
            missing and that ``fused=False`` gives the same results without a compiler.
    """
    from torch.utils import cpp_extension

    fallback = "accepted: fused=False (the eager path: same results, no compiler needed)"
    missing = missing_build_tool()
    if missing is not None:
        raise ImportError(f"Adafactor(fused=True) compiles a C++ kernel, but {missing}; {fallback}.")
    capability = _capability()
    flags, link_flags = _build_flags(capability)
    name = f"optsched_adafactor_v{_VERSION}_{capability.lower().replace(' ', '_')}"
    # once per process: the first use on a machine compiles (~20 s), which would otherwise look like a hang
    logger.info("Adafactor(fused=True): loading the C++ kernel %s (compiled on its first use on a machine, ~20 s)",
                name)
    try:
        module = cpp_extension.load_inline(
            name, cpp_sources=_SOURCE, functions=["stats", "update", "update_momentum"],
            extra_cflags=flags, extra_ldflags=link_flags, verbose=False,
        )
    except (RuntimeError, OSError, ImportError) as exc:  # compiler or linker errors, a broken cache
        where = os.environ.get("TORCH_EXTENSIONS_DIR", "~/.cache/torch_extensions (TORCH_EXTENSIONS_DIR)")
        raise ImportError(
            f"Adafactor(fused=True): building its C++ kernel failed ({exc}); it is built in {where}, which "
            f"must be writable; {fallback}."
        ) from exc
    logger.debug("Adafactor fused kernel %s loaded (flags %s)", name, " ".join(flags))
    return module


def eligible(param: Tensor, grad: Tensor) -> bool:
    """Whether the fused kernel takes this parameter: a non-empty contiguous fp32 CPU matrix, grad alike
    (the step passes fp32 copies of fp16/bf16 parameters). Anything else takes the eager path."""
    return (
        grad.dim() == 2
        and grad.numel() > 0
        and grad.dtype == torch.float32
        and param.dtype == torch.float32
        and grad.device.type == "cpu"
        and param.device.type == "cpu"
        and grad.is_contiguous()
        and param.is_contiguous()
    )
