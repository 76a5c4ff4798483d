"""optsched's checkpoints as transformers reads them, and transformers' as optsched reads them: the
tensor names and tied weights of model.safetensors, the config files, a resume across the two Trainers
(optsched.trainer.checkpoint, optsched.schedules.scheduler)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from optsched.trainer import checkpoint as ckpt
from trainer_helpers import tiny_bert, tiny_gpt2, tiny_llama, tiny_t5

transformers = pytest.importorskip("transformers")


_gpt2, _t5, _llama, _bert = tiny_gpt2, tiny_t5, tiny_llama, tiny_bert


TIED = {"gpt2": _gpt2, "t5": _t5, "llama": _llama}


def _tensors(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return set(f.keys()), f.metadata()


@pytest.mark.parametrize("make", [*TIED.values(), _bert], ids=[*TIED, "bert"])
def test_weights_have_the_names_and_metadata_of_save_pretrained_and_load_exactly(tmp_path, make):
    # tied embeddings are stored under the name transformers keeps (GPT-2's transformer.wte.weight, T5's
    # shared.weight), not safetensors' alphabetical pick (lm_head.weight) with its alias metadata
    torch.manual_seed(0)
    model = make()
    ckpt.save_model_weights(model, tmp_path / "ours")
    model.save_pretrained(tmp_path / "hf")
    assert _tensors(tmp_path / "ours" / ckpt.WEIGHTS_NAME) == _tensors(tmp_path / "hf" / ckpt.WEIGHTS_NAME)
    loaded = type(model).from_pretrained(tmp_path / "ours")
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    if make in TIED.values():
        assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight



@pytest.mark.parametrize("make", [_gpt2, _t5, _bert], ids=["gpt2", "t5", "bert"])
def test_config_files_are_those_save_pretrained_writes(tmp_path, make):
    # config.json names the architecture and dtype (vLLM picks the model by architectures); a model that
    # generates also gets generation_config.json, with what its own generation config holds
    import json

    torch.manual_seed(0)
    model = make()
    if model.can_generate():
        model.generation_config.eos_token_id = [2, 7]
        model.generation_config.max_new_tokens = 5
    config_before = model.config.to_dict()
    ckpt.save_model_weights(model, tmp_path / "ours")
    assert model.config.to_dict() == config_before  # written from a copy
    model.save_pretrained(tmp_path / "hf")
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {p.name for p in (tmp_path / "ours").iterdir()} == files
    assert (ckpt.GENERATION_CONFIG_NAME in files) == model.can_generate()
    for name in files - {ckpt.WEIGHTS_NAME}:
        ours, hf = (json.loads((tmp_path / d / name).read_text()) for d in ("ours", "hf"))
        ours.pop("transformers_version", None), hf.pop("transformers_version", None)
        assert ours == hf, name
    assert json.loads((tmp_path / "ours" / ckpt.CONFIG_NAME).read_text())["architectures"] == [type(model).__name__]
    if model.can_generate():
        generation = transformers.GenerationConfig.from_pretrained(tmp_path / "ours")
        assert generation.eos_token_id == [2, 7] and generation.max_new_tokens == 5


class _SharedTwice(nn.Module):
    """A plain module whose tensors share memory without transformers' tying: ``wte`` registered first,
    ``lm_head`` (alphabetically first) using its Parameter, a module used twice, a buffer's view."""

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(10, 4)
        self.lm_head = nn.Linear(4, 10, bias=False)
        self.lm_head.weight = self.wte.weight
        self.block = nn.Linear(4, 4)
        self.again = self.block
        self.register_buffer("stats", torch.arange(8.0))
        self.register_buffer("first_half", self.stats[:4])


def test_a_plain_module_with_shared_tensors_keeps_each_once_under_its_first_name_and_loads(tmp_path):
    torch.manual_seed(0)
    model = _SharedTwice()
    ckpt.save_model_weights(model, tmp_path)
    assert _tensors(tmp_path / ckpt.WEIGHTS_NAME) == ({"wte.weight", "block.weight", "block.bias", "stats"},
                                                      {"format": "pt"})
    assert not (tmp_path / ckpt.CONFIG_NAME).exists()  # no config to write for a plain module
    torch.manual_seed(1)
    fresh = _SharedTwice()
    ckpt.load_model_weights(fresh, tmp_path)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in model.state_dict().items())
    assert fresh.lm_head.weight is fresh.wte.weight and fresh.again is fresh.block
    assert fresh.first_half.untyped_storage().data_ptr() == fresh.stats.untyped_storage().data_ptr()


def test_the_name_a_transformers_model_declares_tied_is_left_out_whatever_the_order(tmp_path):
    # a head registered before the embedding it is tied to: transformers keeps the embedding's name
    # (all_tied_weights_keys maps the tied name to its source), so optsched does too
    model = nn.Module()
    model.lm_head = nn.Linear(4, 10, bias=False)
    model.embed = nn.Embedding(10, 4)
    model.lm_head.weight = model.embed.weight
    model.all_tied_weights_keys = {"lm_head.weight": "embed.weight"}
    ckpt.save_model_weights(model, tmp_path)
    assert _tensors(tmp_path / ckpt.WEIGHTS_NAME)[0] == {"embed.weight"}


# ---- a resume across the two Trainers ---------------------------------------------------------------


def _lm_data(n=8):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 50, (6,), generator=g), "labels": torch.randint(0, 50, (6,), generator=g)}
            for _ in range(n)]


def _train(trainer_name, make, output_dir, resume=None):
    """4 steps (2 samples each, 8 samples) with a checkpoint every 2; the model's state dict at the end."""
    from optsched import Trainer, TrainingArguments

    kw = dict(output_dir=str(output_dir), max_steps=4, save_steps=2, per_device_train_batch_size=2,
              learning_rate=1e-2, warmup_steps=1, logging_steps=100, disable_tqdm=True, use_cpu=True, seed=0)
    torch.manual_seed(0)
    model = make()
    if trainer_name == "hf":
        trainer = transformers.Trainer(model, transformers.TrainingArguments(report_to="none", **kw),
                                       train_dataset=_lm_data())
    else:
        trainer = Trainer(model, TrainingArguments(**kw), train_dataset=_lm_data())
    trainer.train(resume_from_checkpoint=resume)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("make", [_t5, _llama], ids=["t5", "llama"])
@pytest.mark.parametrize(("writer", "resumer"), [("optsched", "hf"), ("hf", "optsched")])
def test_each_trainer_resumes_the_others_checkpoint_of_a_tied_model_as_its_own(tmp_path, make, writer, resumer):
    # transformers' Trainer loads scheduler.pt into its LambdaLR (optsched's state carries lr_lambdas) and
    # the tied embedding under transformers' name; both continue bitwise as from their own checkpoint
    # (the same data order: both shuffle each epoch with seed + epoch). Not GPT-2: transformers 5.23 does
    # not see that its loss shifts the labels (its loss_type is not ForCausalLM's), counts every label in
    # num_items_in_batch and so trains on 5/6 of the mean loss that optsched's Trainer (and the model) uses
    straight = _train(resumer, make, tmp_path / resumer)
    _train(writer, make, tmp_path / writer)
    resumed = _train(resumer, make, tmp_path / "resumed", resume=tmp_path / writer / "checkpoint-2")
    assert all(torch.equal(v, resumed[k]) for k, v in straight.items())
