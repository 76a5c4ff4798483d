"""neftune_noise_alpha: NEFTune's uniform noise on the input embeddings while training, as transformers'
Trainer adds it (optsched.trainer.neftune)."""

from __future__ import annotations

import pytest
import torch

from optsched import Trainer, TrainerCallback, TrainingArguments
from optsched.trainer.neftune import input_embeddings, neftune_noise, neftune_post_forward_hook
from trainer_helpers import PeftStyleWrapper, PlainRegressor, make_trainer, masked_lm_data, tiny_llama

transformers = pytest.importorskip("transformers")

ALPHA = 5.0


class _DrawAsTransformersLoaderDoes(TrainerCallback):
    """transformers' train DataLoader has no generator of its own, so each epoch's iterator draws its base
    seed, one int64, from the global generator (torch's DataLoader); optsched's loader draws it from its
    own. NEFTune's noise comes from the global generator: with this draw at each epoch, optsched's run
    draws the same noise at the same forward."""

    def on_epoch_begin(self, args, state, control, **kwargs):
        torch.empty((), dtype=torch.int64).random_()


def _fields(tmp_path, **fields):
    return dict(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                learning_rate=1e-2, logging_steps=1, save_strategy="no", disable_tqdm=True, use_cpu=True, seed=0,
                **fields)


def _logged_losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("max_steps", [3, 5], ids=["one-epoch", "two-epochs"])
def test_noisy_training_is_transformers_trainer_bitwise(tmp_path, max_steps):
    # tiny Llama, 12 examples whose labels end in different numbers of -100, GA 2: 3 steps are one epoch
    runs = {}
    for name, alpha in (("optsched", ALPHA), ("hf", ALPHA), ("no-noise", None)):
        torch.manual_seed(0)
        model = tiny_llama()
        kind = "hf" if name == "hf" else "optsched"
        trainer = make_trainer(kind, model, masked_lm_data(),
                               **_fields(tmp_path / name, max_steps=max_steps, neftune_noise_alpha=alpha))
        if kind == "optsched":
            trainer.add_callback(_DrawAsTransformersLoaderDoes())
        trainer.train()
        runs[name] = model.state_dict(), _logged_losses(trainer)
    (ours, our_losses), (hf, hf_losses) = runs["optsched"], runs["hf"]
    assert all(torch.equal(ours[k], v) for k, v in hf.items())
    assert our_losses == hf_losses and len(our_losses) == max_steps
    assert runs["no-noise"][1][0] != our_losses[0]  # the noise changed the very first loss


def test_the_noise_has_transformers_bound_and_only_in_training_mode():
    embeddings = torch.nn.Embedding(50, 16)
    embeddings.neftune_noise_alpha = ALPHA
    clean = embeddings(torch.arange(8).reshape(1, 8))
    noisy = neftune_post_forward_hook(embeddings, None, clean)
    bound = ALPHA / (8 * 16) ** 0.5
    assert 0 < (noisy - clean).abs().max() <= bound
    embeddings.eval()
    assert neftune_post_forward_hook(embeddings, None, clean) is clean


def _clean_logits(model, input_ids):
    """The logits with the embeddings looked up by hand: no forward of the embedding module, no hook."""
    return model(inputs_embeds=model.get_input_embeddings().weight[input_ids]).logits


class _CheckDuringTraining(TrainerCallback):
    """After the first step, with the hook on: eval mode is noise-free, training mode is not."""

    def __init__(self, model):
        self.model, self.checked = model, False

    def on_step_end(self, args, state, control, **kwargs):
        if self.checked:
            return
        ids = torch.arange(8).reshape(1, 8)
        with torch.no_grad():
            self.model.eval()
            assert torch.equal(self.model(input_ids=ids).logits, _clean_logits(self.model, ids))
            self.model.train()
            assert not torch.equal(self.model(input_ids=ids).logits, _clean_logits(self.model, ids))
        self.checked = True


def test_the_hook_is_removed_after_train_and_evaluation_is_noise_free(tmp_path):
    torch.manual_seed(0)
    model = tiny_llama()
    data = masked_lm_data()
    args = TrainingArguments(**_fields(tmp_path, max_steps=2, neftune_noise_alpha=ALPHA, eval_strategy="steps",
                                       eval_steps=1, per_device_eval_batch_size=4))
    check = _CheckDuringTraining(model)
    trainer = Trainer(model, args, train_dataset=data, eval_dataset=data, callbacks=[check])
    trainer.train()
    assert check.checked
    during = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]
    embeddings = model.get_input_embeddings()
    assert not embeddings._forward_hooks and not hasattr(embeddings, "neftune_noise_alpha")
    model.train()
    ids = torch.arange(8).reshape(1, 8)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, _clean_logits(model, ids))  # deterministic again
    assert trainer.evaluate()["eval_loss"] == during[-1]  # the last evaluation ran on these weights, noise-free


class _Fail(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        raise RuntimeError("interrupted")


def test_the_hook_is_removed_when_training_fails(tmp_path):
    # transformers leaves it on (its removal is the last statement of a completed training loop)
    model = tiny_llama()
    args = TrainingArguments(**_fields(tmp_path, max_steps=2, neftune_noise_alpha=ALPHA))
    trainer = Trainer(model, args, train_dataset=masked_lm_data(), callbacks=[_Fail()])
    with pytest.raises(RuntimeError, match="interrupted"):
        trainer.train()
    assert not model.get_input_embeddings()._forward_hooks


def test_a_peft_model_gets_the_noise_on_the_embeddings_of_the_model_it_wraps():
    base = tiny_llama()
    wrapped = PeftStyleWrapper(base)
    assert input_embeddings(wrapped) is base.get_input_embeddings()
    with neftune_noise(wrapped, ALPHA):
        assert base.get_input_embeddings().neftune_noise_alpha == ALPHA
    assert not base.get_input_embeddings()._forward_hooks


class _EmbeddingsNotFound(PlainRegressor):
    def get_input_embeddings(self):  # transformers' PreTrainedModel default, for a model it cannot search
        raise NotImplementedError("`get_input_embeddings` not auto-handled for _EmbeddingsNotFound")


@pytest.mark.parametrize(
    ("model", "problem"),
    [(PlainRegressor, r"has no get_input_embeddings\(\) method"),
     (_EmbeddingsNotFound, r"has no input embeddings that get_input_embeddings\(\) finds \(`get_input_embeddings` not")],
    ids=["no-method", "not-implemented"],
)
def test_a_model_without_input_embeddings_is_refused_when_the_trainer_is_built(tmp_path, model, problem):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, neftune_noise_alpha=ALPHA)
    with pytest.raises(ValueError, match=r"neftune_noise_alpha=5.0 adds noise to the output of the model's input "
                                         rf"embeddings, but the model \({model.__name__}\) {problem}"):
        Trainer(model(), args, train_dataset=[{"x": torch.ones(3), "labels": torch.tensor(1.0)}] * 4)


@pytest.mark.parametrize("alpha", [0, -1.0, float("nan")])
def test_alpha_must_be_a_positive_number(alpha):
    with pytest.raises(ValueError, match=r"neftune_noise_alpha=.* accepted: a number in \(0, inf\)|not finite"):
        TrainingArguments(neftune_noise_alpha=alpha)


def test_under_torch_compile_the_noise_follows_the_hook_whatever_was_compiled_before(tmp_path):
    # torch.compile does not guard its code on forward hooks: code compiled for the class before NEFTune
    # would run without the noise, code compiled with the hook would keep adding it afterwards. transformers'
    # Trainer gets no noise in the second run below
    torch._dynamo.reset()
    runs = {}
    for name, fields in (("compiled", {"torch_compile_backend": "eager"}),
                         ("compiled-noisy", {"torch_compile_backend": "eager", "neftune_noise_alpha": ALPHA}),
                         ("compiled-after", {"torch_compile_backend": "eager"}),
                         ("noisy", {"neftune_noise_alpha": ALPHA})):
        torch.manual_seed(0)
        model = tiny_llama()
        # use_cache=True: compiled and eager Llama then take the same attention path (test_compile.py)
        trainer = Trainer(model, TrainingArguments(**_fields(tmp_path / name, max_steps=2, use_cache=True, **fields)),
                          train_dataset=masked_lm_data())
        trainer.train()
        runs[name] = model.state_dict(), _logged_losses(trainer)
    torch._dynamo.reset()
    for compiled, plain in (("compiled-noisy", "noisy"), ("compiled-after", "compiled")):
        assert all(torch.equal(runs[compiled][0][k], v) for k, v in runs[plain][0].items()), compiled
        assert runs[compiled][1] == runs[plain][1]
    assert runs["noisy"][1] != runs["compiled"][1]
