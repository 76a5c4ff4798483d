"""The end-of-run reports of transformers' example scripts: ``log_metrics``, ``save_metrics``, ``save_state``.

transformers' ``run_*.py`` scripts end with::

    metrics = trainer.train().metrics
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()

:class:`ReportingMixin` gives optsched's Trainer the same three methods, with transformers' formats and
files (``{split}_results.json``, ``all_results.json``, ``trainer_state.json`` in ``output_dir``), on
process 0 only. Two differences, both deliberate: ``log_metrics`` logs its table through
:mod:`logging` (INFO, logger ``optsched.trainer.reporting``) where transformers prints it, and
``save_metrics`` writes each file atomically and refuses to overwrite an ``all_results.json`` it cannot
read (transformers raises a ``JSONDecodeError`` there too, but after truncating nothing; here the
message names the file).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from optsched.trainer.log_levels import logs_at_process_level

__all__ = ["ReportingMixin", "format_metrics", "metrics_table", "speed_metrics"]

logger = logging.getLogger(__name__)

_ALL_RESULTS = "all_results.json"


def speed_metrics(split: str, runtime: float, num_samples: float | None = None, num_steps: int | None = None,
                  num_tokens: int | None = None) -> dict[str, float]:
    """transformers' ``speed_metrics``: ``<split>_runtime`` (seconds, 4 decimals), then, for the counts
    given, ``<split>_samples_per_second``, ``<split>_steps_per_second`` and ``<split>_tokens_per_second``
    (3 decimals; 0.0 for a zero runtime, where transformers leaves them out)."""
    out = {f"{split}_runtime": round(runtime, 4)}
    for name, count in (("samples", num_samples), ("steps", num_steps), ("tokens", num_tokens)):
        if count is not None:
            out[f"{split}_{name}_per_second"] = round(count / runtime, 3) if runtime > 0 else 0.0
    return out


def format_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """transformers' ``metrics_format``: ``*_mem_*`` bytes as ``"<n>MB"``, ``*_runtime*`` seconds as
    ``h:mm:ss.cc``, ``total_flos`` as ``"<n>GF"``, other floats rounded to 4 decimals; the rest as is."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if "_mem_" in key:
            out[key] = f"{int(value) >> 20}MB"
        elif "_runtime" in key:
            centis = int(abs(value - int(value)) * 100)
            out[key] = f"{datetime.timedelta(seconds=int(value))}.{centis:02d}"
        elif key == "total_flos":
            out[key] = f"{int(value) >> 30}GF"
        elif isinstance(value, float):
            out[key] = round(value, 4)
        else:
            out[key] = value
    return out


def metrics_table(split: str, metrics: Mapping[str, Any]) -> list[str]:
    """The lines transformers' ``log_metrics`` prints: a ``***** {split} metrics *****`` header, then
    ``key = value`` per metric, sorted by key, keys left- and values right-aligned."""
    formatted = format_metrics(metrics)
    lines = [f"***** {split} metrics *****"]
    if not formatted:
        return lines
    k_width = max(len(str(k)) for k in formatted)
    v_width = max(len(str(v)) for v in formatted.values())
    lines += [f"  {key: <{k_width}} = {formatted[key]:>{v_width}}" for key in sorted(formatted)]
    return lines


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    # atomic: a crash mid-write leaves the previous file, never half of one
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=4, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


class ReportingMixin:
    """``log_metrics`` / ``save_metrics`` / ``save_state`` for the Trainer (needs ``args.output_dir``,
    ``state``, ``is_world_process_zero()`` and, for log_level, ``dist``)."""

    @logs_at_process_level
    def log_metrics(self, split: str, metrics: Mapping[str, Any]) -> None:
        """Log ``metrics`` as transformers' formatted table (:func:`metrics_table`), at INFO, on process 0."""
        if not self.is_world_process_zero():  # type: ignore[attr-defined]
            return
        logger.info("\n".join(metrics_table(split, metrics)))

    def save_metrics(self, split: str, metrics: Mapping[str, Any], combined: bool = True) -> None:
        """Write ``metrics`` to ``output_dir/{split}_results.json`` and, with ``combined``, merge them into
        ``output_dir/all_results.json`` (process 0 only; raw numbers, indented, sorted keys, as transformers).

        Raises:
            ValueError: ``all_results.json`` exists but is not a JSON object (it is left as it is).
        """
        if not self.is_world_process_zero():  # type: ignore[attr-defined]
            return
        out = Path(self.args.output_dir)  # type: ignore[attr-defined]
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / f"{split}_results.json", dict(metrics))
        if not combined:
            return
        path = out / _ALL_RESULTS
        merged: dict[str, Any] = {}
        if path.exists():
            try:
                merged = json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as exc:
                raise ValueError(
                    f"{path} is not valid JSON ({exc}); it was left as it is. Accepted: move it away, or "
                    "save_metrics(..., combined=False)."
                ) from None
            if not isinstance(merged, dict):
                raise ValueError(f"{path} holds a {type(merged).__name__}, not a JSON object; it was left as it is.")
        merged.update(metrics)
        _write_json(path, merged)

    def save_state(self) -> None:
        """Write ``trainer.state`` to ``output_dir/trainer_state.json`` (process 0 only), as transformers."""
        if not self.is_world_process_zero():  # type: ignore[attr-defined]
            return
        out = Path(self.args.output_dir)  # type: ignore[attr-defined]
        out.mkdir(parents=True, exist_ok=True)
        self.state.save_to_json(out / "trainer_state.json")  # type: ignore[attr-defined]
