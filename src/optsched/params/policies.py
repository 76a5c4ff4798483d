"""Decay policies: given a classified parameter, does weight decay apply to it?

A policy is a pure function ``ParamInfo -> bool`` (True: the parameter decays). Policies are looked up
by name in registries, so adding one is one entry, not a new branch in the group builder:

* base policies: ``"hf"`` (default, transformers' rule: exactly its decisions on transformers models,
  norms also found by type elsewhere) and ``"ndim"`` (timm's rule);
* exemptions, appended with ``+``: ``"no_embeddings"`` also exempts embedding tables, positional
  embeddings and cls / register / distillation / mask tokens. ``"ndim+no_embeddings"`` is timm's rule
  with its usual ``no_weight_decay()`` set (``pos_embed``, ``cls_token``, ...) applied by name.

A callable ``ParamInfo -> bool`` is accepted wherever a name is, and so is its import path
``"module:function"`` (what ``TrainingArguments.to_dict`` writes for a callable, and how YAML and the
CLI name one).
"""

from __future__ import annotations

from collections.abc import Callable

from optsched._validation import check_choice, did_you_mean
from optsched.params.classify import ParamInfo

__all__ = [
    "DecayPolicy",
    "hf_decay_policy",
    "is_embedding_like",
    "list_decay_policies",
    "ndim_decay_policy",
    "resolve_decay_policy",
]

DecayPolicy = Callable[[ParamInfo], bool]

_EMBED_WORDS = frozenset({"embed", "embeds", "embedding", "embeddings"})
_TOKEN_WORDS = frozenset({"token", "tokens"})


def hf_decay_policy(info: ParamInfo) -> bool:
    """transformers' rule: every parameter decays except norm parameters and biases.

    Inside a transformers model (a ``PreTrainedModel``, alone or as part of a larger model) it is
    transformers' own decision, exactly (``info.transformers_exempt``): the same groups as its
    ``Trainer.create_optimizer``, so optimizer states load both ways. Everywhere else it is the robust
    form of the same rule (``info.is_norm`` / ``info.is_bias``): norm layers also by type, ``bias`` as
    a word of the name (see :mod:`optsched.params.classify`). The number of dimensions plays no part,
    so a 1-D tensor that is neither (e.g. a learned scale named ``alpha``) decays, as in transformers.
    """
    if info.in_transformers_model:
        return not info.transformers_exempt
    return not (info.is_norm or info.is_bias)


def ndim_decay_policy(info: ParamInfo) -> bool:
    """timm's rule: tensors of one dimension or fewer do not decay, nor do biases.

    Norm weights, biases and scalar or vector scales (layer scale ``gamma``, ``alpha``) are exempt by
    their shape; a bias of two or more dimensions (rare) is exempt by its name, as in timm.
    """
    return info.ndim >= 2 and not info.is_bias


def is_embedding_like(info: ParamInfo) -> bool:
    """Whether a tensor is an embedding table, a positional embedding or a learned token.

    True for the parameters of ``nn.Embedding`` / ``nn.EmbeddingBag`` (word and positional embedding
    tables: BERT's ``position_embeddings.weight``, GPT-2's ``wpe.weight``), and for parameters whose
    own name has the word ``embed``/``embedding(s)`` or ``token(s)``: ViT's ``pos_embed`` and
    ``position_embeddings``, ``cls_token``, ``register_tokens``, ``dist_token``, ``mask_token``.
    A tied output head (``lm_head.weight`` = the word embedding) counts through its first name.
    """
    if info.is_embedding:
        return True
    words = info.name.rpartition(".")[2].lower().split("_")
    return not _EMBED_WORDS.isdisjoint(words) or not _TOKEN_WORDS.isdisjoint(words)


_DECAY_POLICIES: dict[str, DecayPolicy] = {
    "hf": hf_decay_policy,
    "ndim": ndim_decay_policy,
}

# name -> predicate; a parameter for which it is True does not decay, whatever the base policy says.
_DECAY_EXEMPTIONS: dict[str, DecayPolicy] = {
    "no_embeddings": is_embedding_like,
}


def list_decay_policies() -> list[str]:
    """The names accepted as ``decay_policy``: each base policy, alone and with each exemption."""
    return sorted(
        [*_DECAY_POLICIES, *(f"{base}+{ex}" for base in _DECAY_POLICIES for ex in _DECAY_EXEMPTIONS)]
    )


def resolve_decay_policy(policy: str | DecayPolicy) -> DecayPolicy:
    """Turn a policy name (``"hf"``, ``"ndim"``, ``"hf+no_embeddings"``, ...), a callable or the import
    path of one (``"mypkg.policies:no_decay_on_head"``: a string with ``:``) into the callable.

    Raises:
        ValueError: an unknown base policy or exemption name (with the closest names); an import path
            that cannot be imported.
        TypeError: neither a string nor a callable; an import path to something not callable.
    """
    if callable(policy):
        return policy
    if isinstance(policy, str) and ":" in policy:  # no policy name has one: an import path
        from optsched.params.layers import import_callable

        return import_callable(policy, "decay_policy", "a callable ParamInfo -> bool")
    if not isinstance(policy, str):
        raise TypeError(
            f"decay_policy must be a name ({', '.join(list_decay_policies())}) or a callable "
            f"ParamInfo -> bool, got {type(policy).__name__} {policy!r}."
        )
    base_name, *exemption_names = (part.strip() for part in policy.split("+"))
    if not exemption_names:
        if base_name not in _DECAY_POLICIES:  # the accepted names include the "<base>+<exemption>" forms
            forms = list_decay_policies()
            raise ValueError(
                f"decay_policy={base_name!r} is not a known decay policy.{did_you_mean(base_name, forms)} "
                f"Accepted: {', '.join(sorted(_DECAY_POLICIES))}, alone or with an exemption after '+' "
                f"({', '.join(form for form in forms if '+' in form)})."
            )
        return _DECAY_POLICIES[base_name]
    base = _DECAY_POLICIES[
        check_choice("decay_policy", base_name, _DECAY_POLICIES, what="decay policy (before '+')")
    ]
    exemptions = tuple(
        _DECAY_EXEMPTIONS[check_choice("decay_policy", name, _DECAY_EXEMPTIONS, what="exemption (after '+')")]
        for name in exemption_names
    )

    def combined(info: ParamInfo) -> bool:
        return base(info) and not any(exempt(info) for exempt in exemptions)

    combined.__name__ = combined.__qualname__ = policy
    return combined
