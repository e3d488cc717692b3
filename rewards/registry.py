"""Rewards by name: the registry, the built-in names, and :func:`get_reward`.

Registry entries are of two kinds:

* a **reward function** (``f(prompts, completions, **columns)``): :func:`get_reward` returns it unchanged, or with
  the given keyword arguments bound (``functools.partial``) when there are any;
* a **reward factory** (a class, or a function marked with :func:`reward_factory`): :func:`get_reward` calls it
  with the keyword arguments and returns the reward it builds. Parametrised built-ins (``overlong``'s lengths,
  ``code_exec``'s sandbox limits) are factories whose fields are validated up front.

A name that is not registered but contains a dot or a colon is imported as a dotted path (``"pkg.module:func"``), so a
recipe can name any importable reward, TRL's included.

Example:
    >>> get_reward("overlong", max_length=8, cache_length=4)(["q"], ["abcdefg"])
    [-0.75]
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from model.registry import Registry, import_dotted

F = TypeVar("F", bound=Callable[..., Any])

REWARDS: Registry[Any] = Registry("reward")

_BUILTINS = {
    "accuracy": "rewards.rules:AccuracyReward",
    "format": "rewards.rules:format_reward",
    "overlong": "rewards.rules:OverlongReward",
    "language_consistency": "rewards.language:LanguageConsistencyReward",
    "code_exec": "rewards.code_exec:CodeExecReward",
    "reward_model": "rewards.reward_model:load_reward_model_reward",
    "remote": "rewards.remote:RemoteReward",
}
for _name, _target in _BUILTINS.items():
    REWARDS.register_lazy(_name, _target)


def reward_factory(fn: F) -> F:
    """Marks a function as a reward factory: :func:`get_reward` calls it with the keyword arguments."""
    fn.is_reward_factory = True  # type: ignore[attr-defined]
    return fn


def register_reward(name: str) -> Callable[[F], F]:
    """Decorator registering a reward function or factory under ``name`` (a duplicate name is an error)."""
    return REWARDS.register(name)


def resolve_reward(name_or_path: str) -> Any:
    """Returns the registered object for a name, or imports a dotted path.

    Raises:
        KeyError: for an unknown name without a dot or colon (listing the known names).
        ValueError: for a dotted path that cannot be imported.
    """
    if name_or_path in REWARDS or not any(sep in name_or_path for sep in ".:"):
        return REWARDS.get(name_or_path)
    return import_dotted(name_or_path)


def get_reward(name_or_path: str, **kwargs: Any) -> Callable[..., Any]:
    """Builds a reward from a registered name or a dotted path.

    Args:
        name_or_path: A registered name (``"accuracy"``) or a dotted path (``"pkg.module:func"``).
        **kwargs: Configuration: the fields of a reward factory, or keyword arguments bound to a function.

    Returns:
        A callable following the reward protocol.

    Raises:
        KeyError, ValueError: for an unknown name or a bad path; TypeError for a non-callable target or
            keyword arguments the factory does not accept.
    """
    obj = resolve_reward(name_or_path)
    if isinstance(obj, type) or getattr(obj, "is_reward_factory", False):
        try:
            reward = obj(**kwargs)
        except TypeError as exc:
            raise TypeError(f"reward {name_or_path!r}: bad configuration {sorted(kwargs)}: {exc}") from exc
    elif kwargs:
        reward = functools.update_wrapper(functools.partial(obj, **kwargs), obj)
    else:
        reward = obj
    if not callable(reward):
        raise TypeError(f"reward {name_or_path!r} resolved to a non-callable {type(reward).__name__}")
    return reward


def reward_name(fn: Any) -> str:
    """A readable name for a reward: its ``name`` attribute, ``__name__``, or its class name."""
    return str(getattr(fn, "name", None) or getattr(fn, "__name__", None) or type(fn).__name__)
