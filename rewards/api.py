"""The reward plug-in API: what a reward function is, how it is named, and how it is checked.

A **reward** is a plain Python function, sync or ``async``, called with keyword arguments:

* ``prompt`` (str), ``response`` (str): the text the model saw and wrote;
* ``prompt_ids``, ``response_ids`` (list[int] | None): the token ids, if it wants them;
* ``finish_reason`` (str | None): ``"stop"``, ``"length"`` or ``"aborted"``;
* every field of the dataset row (e.g. ``answer``), under its own name.

It returns a ``float`` (``int`` and ``bool`` are fine), or a :class:`RewardResult` with extra
named numbers to log. Accept ``**kwargs`` so new dataset columns do not break it; without
``**kwargs`` it is called with only the arguments it names::

    @register_reward("contains_answer")
    def contains_answer(response: str, answer: str, **kwargs) -> float:
        return float(str(answer) in response)

A **group reward** scores all responses of one prompt at once (pairwise or relative judges).
It is called with ``prompt``, ``responses`` (list[str]), ``prompt_ids``, ``response_ids``
(list of lists), ``finish_reasons`` and the row's fields, and returns one score (or
:class:`RewardResult`) per response. Mark it with ``@register_reward("name", group=True)``.

A reward is named in config by a **spec**: a registered name (``"exact_match"``), a dotted
path (``"my_pkg.rewards.fn"`` or ``"my_pkg.rewards:fn"``), a file (``"/abs/or/rel/file.py:fn"``),
or a dict ``{"_target_": "my_pkg.rewards.fn", **kwargs}`` whose extra keys are bound with
``functools.partial``. :meth:`RewardSpec.parse` normalises any of them into a picklable
:class:`RewardSpec` that worker processes resolve again.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
import os
import sys
from dataclasses import dataclass, field
from collections.abc import Mapping, Sequence
from typing import Any, Callable

__all__ = [
    "FAILURE_KINDS",
    "GROUP_ARGS",
    "SAMPLE_ARGS",
    "RewardFailure",
    "RewardResult",
    "RewardSignatureError",
    "RewardSpec",
    "RewardSpecError",
    "ScoredSample",
    "check_reward_signature",
    "is_group_reward",
    "normalize_result",
    "register_reward",
    "registered_rewards",
    "resolve_reward",
]

#: Why a sample has no score. ``nan`` covers NaN and +/-inf; ``crashed`` is a worker process
#: that died (segfault, ``os._exit``, OOM kill) while scoring it.
FAILURE_KINDS = ("exception", "timeout", "nan", "not_a_number", "oversized", "crashed")

#: Keyword arguments a per-sample reward can take, besides the dataset row's fields.
SAMPLE_ARGS = ("prompt", "response", "prompt_ids", "response_ids", "finish_reason")
#: Keyword arguments a group reward can take, besides the dataset row's fields.
GROUP_ARGS = ("prompt", "responses", "prompt_ids", "response_ids", "finish_reasons")


@dataclass
class RewardResult:
    """A score plus extra named numbers to log (e.g. ``{"format_ok": 1.0}``)."""

    score: float
    info: dict[str, float] = field(default_factory=dict)


@dataclass
class ScoredSample:
    """The runner's verdict on one sample.

    ``failure`` is ``None`` or one of :data:`FAILURE_KINDS`; ``detail`` then holds the error
    text. ``score`` is the weighted total, or for a failed sample what the failure policy says:
    ``failure_score`` (policies ``score`` and ``stop``) or ``None`` (``drop_group``).
    """

    score: float | None
    info: dict[str, float] = field(default_factory=dict)
    failure: str | None = None
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.failure is not None


class RewardSignatureError(TypeError):
    """A reward function cannot be called with the dataset's rows."""


class RewardSpecError(ValueError):
    """A reward spec names nothing that can be imported or called."""


class RewardFailure(Exception):
    """Raised inside the runner when a result is unusable; ``kind`` is a failure kind."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


# --------------------------------------------------------------------------------------------
# Registry

_REGISTRY: dict[str, Callable[..., Any]] = {}
_FILE_MODULES: dict[str, str] = {}  # module name given to a file-loaded module -> its path


def register_reward(name: str | Callable | None = None, *, group: bool = False):
    """Register a reward under ``name`` (default: the function's name).

    Use as ``@register_reward``, ``@register_reward("name")`` or
    ``@register_reward("name", group=True)`` for a group reward. The function is returned
    unchanged, apart from a ``__grove_reward__`` attribute. Registering another function under
    a taken name raises ``ValueError``.
    """

    def deco(fn: Callable) -> Callable:
        reg_name = name if isinstance(name, str) else fn.__name__
        old = _REGISTRY.get(reg_name)
        if old is not None and _location(old) != _location(fn):
            raise ValueError(
                f"reward name {reg_name!r} is already registered by {_describe(old)}; "
                f"pick another name for {_describe(fn)}"
            )
        fn.__grove_reward__ = {"name": reg_name, "group": group}
        _REGISTRY[reg_name] = fn
        return fn

    if callable(name):  # bare @register_reward
        return deco(name)
    return deco


def registered_rewards() -> dict[str, Callable[..., Any]]:
    """Every registered reward by name, the built-ins included."""
    _load_builtins()
    return dict(_REGISTRY)


def _load_builtins() -> None:
    importlib.import_module("rewards.builtin")


def _unwrap(fn: Callable) -> Callable:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.unwrap(fn)


def is_group_reward(fn: Callable) -> bool:
    """True if ``fn`` was registered with ``group=True``."""
    meta = getattr(_unwrap(fn), "__grove_reward__", None)
    return bool(meta and meta.get("group"))


def is_async_reward(fn: Callable) -> bool:
    target = _unwrap(fn)
    return inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(
        getattr(target, "__call__", None)
    )


def _location(fn: Callable) -> tuple[str, str]:
    fn = _unwrap(fn)
    return (_source_file(fn) or getattr(fn, "__module__", "?"), getattr(fn, "__qualname__", repr(fn)))


def _source_file(fn: Callable) -> str | None:
    try:
        return inspect.getsourcefile(_unwrap(fn))
    except TypeError:
        return None


def _describe(fn: Callable) -> str:
    """``'name' (/path/file.py:12)`` for error messages."""
    target = _unwrap(fn)
    qual = getattr(target, "__qualname__", None) or type(target).__name__
    where = _source_file(target) or getattr(target, "__module__", "?")
    try:
        line = inspect.getsourcelines(target)[1]
        where = f"{where}:{line}"
    except (OSError, TypeError):
        pass
    return f"{qual!r} ({where})"


# --------------------------------------------------------------------------------------------
# Specs


def _plain(obj: Any) -> Any:
    """Config containers (e.g. OmegaConf) to plain dicts and lists, so they pickle anywhere."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)):
        return [_plain(v) for v in obj]
    return obj


def _is_file_target(left: str) -> bool:
    return left.endswith(".py") or os.sep in left or left.startswith("~")


def _package_root(module_name: str, file: str | None) -> str | None:
    """The sys.path entry that made ``module_name`` importable from ``file``."""
    if not file:
        return None
    path = os.path.abspath(file)
    depth = module_name.count(".") + 1
    if os.path.basename(path) == "__init__.py":
        path = os.path.dirname(path)
    for _ in range(depth):
        path = os.path.dirname(path)
    return path


@dataclass
class RewardSpec:
    """A normalised, picklable reference to a reward that any process can resolve.

    ``target`` is ``"module:qualname"`` or ``"/abs/path/file.py:qualname"``; ``sys_path``
    lists directories a fresh process appends to ``sys.path`` before importing it (the
    launching directory, ``search_paths``, the file's folder). ``kwargs`` are bound with
    ``functools.partial``. ``name`` labels the reward in logs and metrics.
    """

    target: str
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    sys_path: tuple[str, ...] = ()
    group: bool | None = None

    @classmethod
    def parse(
        cls,
        spec: Any,
        *,
        kwargs: Mapping[str, Any] | None = None,
        name: str | None = None,
        group: bool | None = None,
        search_paths: tuple[str, ...] | list[str] = (),
        cwd: str | None = None,
    ) -> "RewardSpec":
        """Normalise any accepted spec form; raises :class:`RewardSpecError` with a clear message."""
        cwd = os.path.abspath(cwd or os.getcwd())
        base_path = [cwd] + [os.path.abspath(os.path.join(cwd, os.path.expanduser(p))) for p in search_paths]
        extra = dict(_plain(kwargs or {}))
        if isinstance(spec, Mapping):
            spec = _plain(spec)
            if "_target_" not in spec:
                raise RewardSpecError(f"reward spec {spec!r} is a dict without '_target_'")
            extra = {**{k: v for k, v in spec.items() if k != "_target_"}, **extra}
            spec = spec["_target_"]
        if callable(spec) and not isinstance(spec, str):
            return cls._from_callable(spec, extra, name, group, base_path)
        if not isinstance(spec, str) or not spec.strip():
            raise RewardSpecError(f"reward spec must be a name, a dotted path or 'file.py:fn', got {spec!r}")
        spec = spec.strip()
        left, sep, right = spec.rpartition(":")
        if sep and _is_file_target(left):
            path = cls._find_file(left, base_path, spec)
            return cls(f"{path}:{right}", name or right.rsplit(".", 1)[-1], extra,
                       tuple(dict.fromkeys(base_path + [os.path.dirname(path)])), group)
        if sep:  # "pkg.mod:fn"
            cls._import(left, spec, base_path)
            return cls(f"{left}:{right}", name or right.rsplit(".", 1)[-1], extra,
                       cls._paths_for(left, base_path), group)
        if "." not in spec and os.sep not in spec:  # a registered name
            fn = _lookup_registered(spec, base_path)
            out = cls._from_callable(fn, extra, name or spec, group, base_path)
            return out
        return cls._from_dotted(spec, extra, name, group, base_path)

    @staticmethod
    def _find_file(left: str, base_path: list[str], spec: str) -> str:
        path = os.path.expanduser(left)
        candidates = [path] if os.path.isabs(path) else [os.path.join(b, path) for b in base_path]
        for c in candidates:
            if os.path.isfile(c):
                return os.path.abspath(c)
        raise RewardSpecError(
            f"reward spec {spec!r}: file {left!r} not found (looked at: {', '.join(candidates)})"
        )

    @staticmethod
    def _import(module: str, spec: str, base_path: list[str]):
        _extend_sys_path(base_path)
        try:
            return importlib.import_module(module)
        except ImportError as exc:
            raise RewardSpecError(
                f"reward spec {spec!r}: cannot import module {module!r}: {exc}. "
                f"Searched sys.path plus {base_path}; add the folder holding it to "
                f"reward.search_paths, or give a file path ('/path/to/file.py:fn')."
            ) from exc

    @staticmethod
    def _paths_for(module: str, base_path: list[str]) -> tuple[str, ...]:
        mod = sys.modules.get(module)
        root = _package_root(module, getattr(mod, "__file__", None))
        return tuple(dict.fromkeys(base_path + ([root] if root else [])))

    @classmethod
    def _from_dotted(cls, spec, extra, name, group, base_path) -> "RewardSpec":
        parts = spec.split(".")
        errors = []
        _extend_sys_path(base_path)
        for i in range(len(parts) - 1, 0, -1):
            module = ".".join(parts[:i])
            try:
                importlib.import_module(module)
            except ImportError as exc:
                errors.append(f"{module}: {exc}")
                continue
            qual = ".".join(parts[i:])
            return cls(f"{module}:{qual}", name or parts[-1], extra, cls._paths_for(module, base_path), group)
        known = ", ".join(sorted(registered_rewards()))
        raise RewardSpecError(
            f"reward spec {spec!r}: no importable module in it ({'; '.join(errors)}). "
            f"Registered names: {known}. For a file outside any package use '/path/to/file.py:fn'."
        )

    @classmethod
    def _from_callable(cls, fn, extra, name, group, base_path) -> "RewardSpec":
        target = fn
        while isinstance(target, functools.partial):
            extra = {**target.keywords, **extra}
            target = target.func
        module = getattr(target, "__module__", None)
        qual = getattr(target, "__qualname__", None)
        display = name or getattr(target, "__grove_reward__", {}).get("name") or getattr(target, "__name__", "reward")
        if not module or not qual or "<" in qual:
            raise RewardSpecError(
                f"reward {_describe(target)} is a lambda, closure or nested function: worker "
                f"processes cannot import it. Define it at module level, or set "
                f"reward.isolated=false to run it in-process."
            )
        file = _FILE_MODULES.get(module)
        if file is None and module == "__main__":
            file = getattr(sys.modules["__main__"], "__file__", None)
            if file is None:
                raise RewardSpecError(
                    f"reward {_describe(target)} lives in an interactive __main__; save it to a file."
                )
        if file is not None:
            file = os.path.abspath(file)
            paths = tuple(dict.fromkeys(base_path + [os.path.dirname(file)]))
            return cls(f"{file}:{qual}", display, extra, paths, group)
        return cls(f"{module}:{qual}", display, extra, cls._paths_for(module, base_path), group)

    def resolve(self) -> Callable[..., Any]:
        """Import the target (in this process) and bind ``kwargs``."""
        _extend_sys_path(self.sys_path)
        left, _, qual = self.target.rpartition(":")
        if _is_file_target(left):
            module = _load_file(left)
        else:
            try:
                module = importlib.import_module(left)
            except ImportError as exc:
                raise RewardSpecError(f"reward {self.name!r}: cannot import {left!r}: {exc}") from exc
        obj: Any = module
        for attr in qual.split("."):
            try:
                obj = getattr(obj, attr)
            except AttributeError:
                names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
                raise RewardSpecError(
                    f"reward {self.name!r}: {left!r} has no attribute {qual!r}. "
                    f"Callables there: {', '.join(names) or '(none)'}"
                ) from None
        if not callable(obj):
            raise RewardSpecError(f"reward {self.name!r}: {self.target!r} is a {type(obj).__name__}, not a function")
        return functools.partial(obj, **self.kwargs) if self.kwargs else obj

    def is_group(self, fn: Callable | None = None) -> bool:
        if self.group is not None:
            return self.group
        return is_group_reward(fn if fn is not None else self.resolve())


def _extend_sys_path(paths) -> None:
    for p in paths:
        if p and p not in sys.path:
            sys.path.append(p)


def _load_file(path: str):
    """Import a .py file by path, once per process, under a stable private module name."""
    path = os.path.abspath(os.path.expanduser(path))
    mod_name = "grove_reward_" + hashlib.sha1(path.encode()).hexdigest()[:12]
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    if not os.path.isfile(path):
        raise RewardSpecError(f"reward file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    _FILE_MODULES[mod_name] = path
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[mod_name]
        raise
    return module


def _lookup_registered(name: str, base_path) -> Callable:
    _load_builtins()
    if name in _REGISTRY:
        return _REGISTRY[name]
    close = difflib.get_close_matches(name, _REGISTRY, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise RewardSpecError(
        f"no reward registered as {name!r}.{hint} Registered: {', '.join(sorted(_REGISTRY))}. "
        f"Use a dotted path ('my_pkg.my_mod.fn' or 'my_pkg.my_mod:fn') or a file "
        f"('/path/to/my_reward.py:fn') for your own function."
    )


def resolve_reward(spec: Any, **parse_kwargs: Any) -> Callable[..., Any]:
    """The callable behind any spec form (name, dotted path, file path, ``_target_`` dict)."""
    if callable(spec) and not isinstance(spec, str) and not parse_kwargs:
        return spec
    return RewardSpec.parse(spec, **parse_kwargs).resolve()


# --------------------------------------------------------------------------------------------
# Signatures and results


@dataclass(frozen=True)
class ParamInfo:
    """How to call a function: the keyword names it takes, or all of them (``**kwargs``)."""

    var_keyword: bool
    names: frozenset[str]

    @classmethod
    def of(cls, fn: Callable) -> "ParamInfo":
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):  # e.g. some C callables: pass everything
            return cls(True, frozenset())
        var_kw = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
        names = frozenset(
            n for n, p in sig.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        )
        return cls(var_kw, names)

    def select(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        if self.var_keyword:
            return kwargs
        return {k: v for k, v in kwargs.items() if k in self.names}


def check_reward_signature(
    fn: Callable, example_row: Mapping[str, Any], *, group: bool | None = None, name: str | None = None
) -> None:
    """Check ``fn`` can be called with this row's fields; raise :class:`RewardSignatureError` if not.

    The message names the function and its file, the parameters the row cannot supply, and
    the keyword arguments that are available.
    """
    group = is_group_reward(fn) if group is None else group
    base = GROUP_ARGS if group else SAMPLE_ARGS
    available = list(base) + [k for k in example_row if k not in base]
    qual = getattr(_unwrap(fn), "__qualname__", None)
    label = f"reward {name!r} = {_describe(fn)}" if name and name != qual else f"reward {_describe(fn)}"
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        raise RewardSignatureError(f"{label}: cannot read its signature ({exc})") from exc
    problems = []
    missing = [
        n for n, p in sig.parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty and n not in available
    ]
    positional_only = [n for n, p in sig.parameters.items() if p.kind is p.POSITIONAL_ONLY and p.default is p.empty]
    if missing:
        problems.append(f"required parameter(s) the row does not supply: {', '.join(missing)}")
    if positional_only:
        problems.append(
            f"positional-only parameter(s) {', '.join(positional_only)}: rewards are called with keywords only"
        )
    if not problems:
        return
    hints = []
    if not group and "responses" in missing:
        hints.append("it looks like a group reward: register it with @register_reward(name, group=True)")
    if group and "response" in missing:
        hints.append("group rewards receive 'responses' (a list), not 'response'")
    hints.append(
        "rename the parameter to one of the available names, give it a default, bind it with "
        "kwargs in the config, or add the field to the dataset"
    )
    raise RewardSignatureError(
        f"{label} cannot be called with this dataset's rows:\n  "
        + "\n  ".join(problems)
        + f"\n  available keyword arguments: {', '.join(available)}\n  fix: " + "; ".join(hints)
    )


def _short(obj: Any, n: int = 120) -> str:
    try:
        text = repr(obj)
    except Exception:  # noqa: BLE001 - a broken __repr__ must not break the runner
        text = f"<{type(obj).__name__}>"
    return text if len(text) <= n else text[:n] + "..."


def _as_float(value: Any, what: str) -> float:
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, numbers.Real):
        raise RewardFailure(
            "not_a_number",
            f"{what} is {type(value).__name__} {_short(value)}, not a real number",
        )
    return float(value)


def normalize_result(value: Any) -> tuple[float, dict[str, float]]:
    """A reward's return value as ``(score, info)``; raises :class:`RewardFailure`.

    Accepts a real number (``bool``, ``int``, numpy scalars included), a
    :class:`RewardResult`, or a mapping with a ``"score"`` key (other keys become ``info``).

    >>> normalize_result(1)
    (1.0, {})
    >>> normalize_result(RewardResult(0.5, {"len": 3}))
    (0.5, {'len': 3.0})
    >>> normalize_result(float("nan"))
    Traceback (most recent call last):
    ...
    rewards.api.RewardFailure: nan: score is nan
    """
    if isinstance(value, RewardResult):
        score, info = value.score, value.info
    elif isinstance(value, Mapping) and "score" in value:
        score, info = value["score"], {k: v for k, v in value.items() if k != "score"}
    else:
        score, info = value, {}
    score = _as_float(score, "score")
    if not math.isfinite(score):
        raise RewardFailure("nan", f"score is {score}")
    if not isinstance(info, Mapping):
        raise RewardFailure("not_a_number", f"info is {type(info).__name__}, not a dict of numbers")
    out = {}
    for k, v in info.items():
        if not isinstance(k, str):
            raise RewardFailure("not_a_number", f"info key {_short(k)} is not a string")
        out[k] = _as_float(v, f"info[{k!r}]")
    return score, out
