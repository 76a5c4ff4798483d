"""The optimizer registry: one frozen :class:`OptimizerSpec` per name (timm ``OptimInfo`` style).

A spec says *what* an optimizer name means (which class, which package provides it, how the common
``TrainingArguments`` fields map onto its keyword arguments, which ``optim_args`` keys it accepts,
which keyword arguments are fixed) and leaves *building* to :mod:`optsched.optim.factory`. A variant
is a new name plus different fixed kwargs or defaults, never a subclass.

Classes are registered by dotted path and imported only when the name is used, so importing
``optsched`` never imports bitsandbytes, torchao, schedulefree, ...
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib
import importlib.util
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from optsched._validation import check_bool, check_choice, missing_package

__all__ = [
    "COMMON_ARGS",
    "OMIT",
    "OptimArg",
    "OptimizerSpec",
    "get_optimizer_spec",
    "list_optimizers",
    "register_optimizer",
    "unregister_optimizer",
]

logger = logging.getLogger(__name__)


class _Omit:
    """Sentinel: an ``optim_args`` key without a default is passed only when the user gives it."""

    _instance: _Omit | None = None

    def __new__(cls) -> _Omit:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "OMIT"


OMIT: Any = _Omit()

#: The value types an ``optim_args`` key may declare (converters live in :mod:`optim_args`).
ARG_TYPES = ("float", "int", "bool", "str", "dtype", "floats")


@dataclass(frozen=True)
class OptimArg:
    """One ``optim_args`` key an optimizer accepts.

    Attributes:
        name: the key as the user writes it (``"momentum"``).
        type: one of ``float, int, bool, str, dtype, floats`` (``floats`` is a tuple of floats).
        default: the value passed when the user gives none; :data:`OMIT` (the default) passes
            nothing, so the optimizer's own default applies.
        kwarg: the keyword argument it becomes, when that differs from ``name``.
        help: one line shown by ``optsched`` explain/listing tools.
    """

    name: str
    type: str = "float"
    default: Any = OMIT
    kwarg: str | None = None
    help: str = ""

    def __post_init__(self) -> None:
        check_choice("OptimArg.type", self.type, ARG_TYPES, what="optim_args type")

    @property
    def target(self) -> str:
        """The keyword argument name this key is passed as."""
        return self.kwarg or self.name


def _explicit(args: Any, name: str) -> bool:
    """Whether ``args.<name>`` was set by the user (optsched's TrainingArguments tracks this).

    ``args.is_explicit(name)`` is preferred, then ``name in args.explicit_fields``; an object that
    tracks neither (a plain namespace) counts as all-defaults.
    """
    is_explicit = getattr(args, "is_explicit", None)
    if callable(is_explicit):
        return bool(is_explicit(name))
    fields = getattr(args, "explicit_fields", None)
    return fields is not None and name in fields


def _sgd_momentum(args: Any) -> Any:
    # The seed's example sets adam_beta1=0.9 "used as momentum for SGD". HF ignores it; we honour it
    # only when the user set adam_beta1 explicitly, so defaults still build HF's SGD (no momentum).
    return args.adam_beta1 if _explicit(args, "adam_beta1") else OMIT


#: How the common ``TrainingArguments`` fields become keyword arguments. A spec lists the keys it
#: uses in ``OptimizerSpec.common``; a source returning :data:`OMIT` passes nothing.
COMMON_ARGS: Mapping[str, Callable[[Any], Any]] = MappingProxyType(
    {
        "lr": lambda a: a.learning_rate,
        "betas": lambda a: (a.adam_beta1, a.adam_beta2),
        "eps": lambda a: a.adam_epsilon,
        "weight_decay": lambda a: a.weight_decay,
        "momentum": _sgd_momentum,
    }
)


@dataclass(frozen=True)
class OptimizerSpec:
    """What an optimizer name means.

    Attributes:
        name: the registry key, as given in ``TrainingArguments.optim``.
        cls: the optimizer class (or a factory, see ``is_optimizer_factory``), or its dotted path
            (``"bitsandbytes.optim.AdamW"``), or a tuple of dotted paths tried in order (a package
            that moved a class between versions). Imported only by :meth:`load_class`.
        package: the pip package that provides ``cls``; ``None`` for torch and optsched classes.
        extra: the optsched extra that installs ``package`` (``pip install 'optsched[extra]'``).
        common: which common arguments it takes, keys of :data:`COMMON_ARGS`, in order.
        optim_args: the ``optim_args`` keys it accepts; any other key is a ``ValueError``.
        fixed: keyword arguments always passed (``{"fused": True}``, ``{"optim_bits": 8}``).
        needs_model: the builder needs the model (GaLore/APOLLO target modules, LOMO).
        builder: a hook ``builder(ctx) -> (cls, kwargs)`` for families whose kwargs are not a plain
            merge (ctx is a :class:`optsched.optim.factory.BuildContext`).
        requires_device: a device type the parameters must live on (``"cuda"``), or ``None``.
        needs_train_eval: the optimizer must be put in ``train()``/``eval()`` mode (schedule-free).
        description: one line for listings.
    """

    name: str
    cls: Any
    package: str | None = None
    extra: str | None = None
    common: tuple[str, ...] = ("lr",)
    optim_args: tuple[OptimArg, ...] = ()
    fixed: Mapping[str, Any] = field(default_factory=dict)
    needs_model: bool = False
    builder: Callable[..., tuple[Any, dict[str, Any]]] | None = None
    requires_device: str | None = None
    needs_train_eval: bool = False
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"OptimizerSpec.name must be a non-empty string, got {self.name!r}.")
        if self.cls is None:
            raise TypeError(f"OptimizerSpec({self.name!r}).cls must be a class, a factory or a dotted path.")
        for field_name, item_type, example in (
            ("common", str, "('lr', 'betas')"),
            ("optim_args", OptimArg, "(OptimArg('momentum'),)"),
        ):
            value = getattr(self, field_name)
            if not isinstance(value, (tuple, list)) or not all(isinstance(v, item_type) for v in value):
                raise TypeError(
                    f"OptimizerSpec({self.name!r}).{field_name} must be a tuple of {item_type.__name__}, "
                    f"e.g. {example}, got {type(value).__name__} {value!r}."
                )
        for key in self.common:
            check_choice(f"OptimizerSpec({self.name!r}).common", key, COMMON_ARGS, what="common argument")
        keys = [a.name for a in self.optim_args]
        if len(set(keys)) != len(keys):
            raise ValueError(f"OptimizerSpec({self.name!r}).optim_args repeats a key: {keys}.")
        check_bool("OptimizerSpec.needs_model", self.needs_model)
        check_bool("OptimizerSpec.needs_train_eval", self.needs_train_eval)
        # Frozen all the way down: a spec is shared by every caller.
        object.__setattr__(self, "optim_args", tuple(self.optim_args))
        object.__setattr__(self, "common", tuple(self.common))
        object.__setattr__(self, "fixed", MappingProxyType(dict(self.fixed)))

    @property
    def accepted_keys(self) -> list[str]:
        """The ``optim_args`` keys this optimizer accepts."""
        return [a.name for a in self.optim_args]

    def replace(self, **changes: Any) -> OptimizerSpec:
        """A copy with some fields changed: how a variant (a new name plus defaults) is made."""
        changes["fixed"] = dict(changes.get("fixed", self.fixed))  # the proxy is rebuilt in __post_init__
        return dataclasses.replace(self, **changes)

    def resolve_kwargs(self, args: Any, user: Mapping[str, Any]) -> dict[str, Any]:
        """The keyword arguments this name passes to its class, before any builder hook.

        In order, later ones winning: the common arguments read from ``args`` (``lr``, ``betas``,
        ``eps``, ... per :data:`COMMON_ARGS`; an ``OMIT`` value is left out), the spec's ``fixed``
        kwargs, then each declared ``optim_args`` key, from ``user`` (already parsed by
        ``parse_optim_args``) or its default. One place for this, shared by the factory and the
        memory estimate, so the estimate always describes the optimizer ``create_optimizer`` builds.
        """
        kwargs: dict[str, Any] = {}
        for key in self.common:
            value = COMMON_ARGS[key](args)
            if value is not OMIT:
                kwargs[key] = value
        kwargs.update(self.fixed)
        for arg in self.optim_args:
            if arg.name in user:
                kwargs[arg.target] = user[arg.name]
            elif arg.default is not OMIT:
                kwargs[arg.target] = arg.default
        return kwargs

    def load_class(self) -> Any:
        """Import and return ``cls``.

        Raises:
            ImportError: the package is not installed (naming ``pip install 'optsched[extra]'``),
                or installed but too old to provide the class.
        """
        if not isinstance(self.cls, (str, tuple)):
            return self.cls
        paths = (self.cls,) if isinstance(self.cls, str) else self.cls
        last_error: Exception | None = None
        for path in paths:
            module_name, _, attr = path.rpartition(".")
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                missing = exc.name or ""
                root = module_name.split(".")[0]
                if missing == root or _not_installed(root):
                    raise self._missing(root) from exc
                if module_name.startswith(missing + ".") or missing == module_name:
                    last_error = exc  # the package is there but this submodule is not: next path
                    continue
                raise  # a dependency of the package is missing: its own message names it
            except Exception as exc:  # installed, but breaks on import (e.g. built for a newer torch)
                import torch

                raise ImportError(
                    f"optim={self.name!r} needs {self.package or module_name}, which is installed but failed "
                    f"to import with torch {torch.__version__} ({type(exc).__name__}: {exc}). Install a release "
                    f"of {self.package or module_name} that supports this torch, or a newer torch."
                ) from exc
            if hasattr(module, attr):
                return getattr(module, attr)
            last_error = AttributeError(f"module {module_name!r} has no attribute {attr!r}")
        raise ImportError(
            f"optim={self.name!r} needs {' or '.join(paths)}, which the installed "
            f"{self.package or 'torch'} does not provide ({last_error}). "
            + (
                f"Upgrade it with: pip install -U 'optsched[{self.extra}]'"
                if self.extra
                else f"Upgrade it with: pip install -U {self.package or 'torch'}"
            )
        ) from last_error

    def _missing(self, module: str) -> ImportError:
        needed_for = f"optim={self.name!r}"
        if self.extra:
            return missing_package(self.package or module, self.extra, needed_for)
        if self.package is None:  # a user's spec that does not say which package provides the class
            return ImportError(
                f"{needed_for} needs the module {module!r} (cls={self.cls!r}), which is not installed; "
                "install the package that provides it."
            )
        return ImportError(
            f"{needed_for} needs the package {self.package!r}, which is not installed "
            f"(it has no optsched extra: install it following its own instructions, "
            f"e.g. pip install {self.package})."
        )


def _not_installed(root: str) -> bool:
    try:
        return importlib.util.find_spec(root) is None
    except (ImportError, ValueError):
        return True


_REGISTRY: dict[str, OptimizerSpec] = {}
_LOCK = threading.Lock()


def register_optimizer(
    spec_or_name: OptimizerSpec | str,
    cls: Any = None,
    *,
    overwrite: bool = False,
    **fields: Any,
) -> OptimizerSpec:
    """Add an optimizer name to the registry.

    Either ``register_optimizer(OptimizerSpec(...))`` or the short form
    ``register_optimizer("my_adam", MyAdam, common=("lr", "betas", "eps"), optim_args=(...))``.

    Args:
        spec_or_name: a spec, or the name of a new one built from ``cls`` and ``fields``.
        cls: the class, factory or dotted path (short form only).
        overwrite: replace an existing name; without it re-registering a name is an error.
        **fields: further :class:`OptimizerSpec` fields (short form only).

    Returns:
        The registered spec.

    Raises:
        ValueError: the name is taken and ``overwrite`` is False.
        TypeError: a spec was given together with ``cls``/fields.
    """
    check_bool("overwrite", overwrite)
    _ensure_catalog()  # built-ins first, so a user's name never gets overwritten by them later
    if isinstance(spec_or_name, OptimizerSpec):
        if cls is not None or fields:
            raise TypeError("register_optimizer(spec) takes no cls or fields; use spec.replace(...) instead.")
        spec = spec_or_name
    elif isinstance(spec_or_name, str):
        spec = OptimizerSpec(name=spec_or_name, cls=cls, **fields)
    else:
        raise TypeError(
            f"register_optimizer expects an OptimizerSpec or a name, got {type(spec_or_name).__name__}."
        )
    with _LOCK:
        if spec.name in _REGISTRY and not overwrite:
            raise ValueError(
                f"optim={spec.name!r} is already registered; pass overwrite=True to replace it."
            )
        _REGISTRY[spec.name] = spec
    logger.debug("registered optimizer %r", spec.name)
    return spec


def unregister_optimizer(name: str) -> OptimizerSpec:
    """Remove a name (and return its spec); ``ValueError`` when it is not registered."""
    spec = get_optimizer_spec(name)
    with _LOCK:
        del _REGISTRY[spec.name]
    return spec


def get_optimizer_spec(name: Any) -> OptimizerSpec:
    """The spec registered under ``name`` (an enum whose value is a name is accepted).

    Raises:
        TypeError: ``name`` is not a string.
        ValueError: unknown name; the message has the closest names and every accepted one.
    """
    _ensure_catalog()
    return _REGISTRY[check_choice("optim", name, _REGISTRY, what="optimizer name")]


def list_optimizers(pattern: str | None = None) -> list[str]:
    """Sorted registered names, optionally filtered by an ``fnmatch`` pattern (``"*adamw*"``)."""
    _ensure_catalog()
    names = sorted(_REGISTRY)
    if pattern is None:
        return names
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a string, got {type(pattern).__name__} {pattern!r}.")
    return [n for n in names if fnmatch.fnmatchcase(n, pattern)]


def _ensure_catalog() -> None:
    # The built-in names live in catalog.py, which registers them on import.
    from optsched.optim import catalog  # noqa: F401
