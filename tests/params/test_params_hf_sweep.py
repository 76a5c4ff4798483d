"""The decay / no-decay groups equal transformers' on every model class it ships (~1,000, built tiny).

``hf_grouping_sweep.py`` (beside this file; also a script) builds every class of transformers' auto
mappings from its config class alone and compares optsched's ``create_optimizer`` groups with what
``Trainer.create_optimizer`` builds, all parameters trainable and every third one frozen.
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

pytest.importorskip("transformers")

import hf_grouping_sweep as sweep  # noqa: E402

#: Classes built per mapping with transformers 5.23 (constraints.txt); the rest need timm, natten,
#: detectron2 or settings a default config lacks. A floor, so that a sweep that silently builds
#: nothing fails.
BUILT = {
    "MODEL_MAPPING_NAMES": 561,
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES": 161,
    "MODEL_FOR_MASKED_LM_MAPPING_NAMES": 49,
    "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES": 33,
    "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES": 42,
    "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES": 119,
    "MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES": 17,
    "MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES": 8,
    "MODEL_FOR_CTC_MAPPING_NAMES": 8,
}
SHARDS = {"MODEL_MAPPING_NAMES": 4}  # the base models take ~45 s: spread over the workers


def test_the_table_names_every_swept_mapping():
    assert set(BUILT) == set(sweep.MAPPINGS)


@pytest.mark.parametrize(
    "mapping, shard",
    [(mapping, shard) for mapping in sweep.MAPPINGS for shard in range(SHARDS.get(mapping, 1))],
)
def test_groups_equal_transformers_on_every_model_class(mapping, shard):
    swept = _sweep(mapping, shard, SHARDS.get(mapping, 1))
    built = [o for o in swept if o.status != "skipped"]
    mismatched = {
        o.label: [f"{d['name']} (transformers {d['transformers']}, optsched {d['optsched']}: {d['optsched_rule']})"
                  for d in o.diffs[:3]]
        for o in built if o.status == "mismatch"
    }  # fmt: skip
    assert not mismatched
    assert not [f"{o.label}: {o.how}" for o in built if o.status == "error"]
    expected = BUILT[mapping] // SHARDS.get(mapping, 1)
    assert len(built) >= expected - 10, f"only {len(built)} of {len(swept)} classes built (expected ~{expected})"


def _sweep(mapping: str, shard: int, shards: int) -> list[sweep.Outcome]:
    """The outcomes of the model types of ``mapping`` at positions ``shard``, ``shard + shards``, ..."""
    from transformers.models.auto import modeling_auto

    types = list(getattr(modeling_auto, mapping))
    only = None if shards == 1 else set(types[shard::shards])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return sweep.sweep(only=only, mappings=(mapping,))
    finally:
        torch.set_num_threads(threads)
        logging.disable(logging.NOTSET)
