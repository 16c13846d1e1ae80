"""A user's own function named in a config: `package.module:function`, resolved and called with the
config's arguments, every failure turned into a `ConfigError` naming the config key.

Resolution is `pkgutil.resolve_name`'s (the standard library's reading of such paths, as nerfstudio
and torchtune use it); the config file's folder is on `sys.path` (`load_config`), so a `.py` next
to the config resolves. A factory or source never comes from the standard library: that keeps a
config from reaching `builtins:exec` or `os:system`. Hand-written: binding the arguments first, so a
wrong argument is named before the user's code runs.
"""

from __future__ import annotations

import inspect
import pkgutil
import sys
import traceback
from collections.abc import Callable, Mapping
from typing import Any

from pipeline.errors import ConfigError, PipelineError


def resolve_function(path: str, key: str) -> Callable[..., Any]:
    """The callable `path` names; `ConfigError(key)` when it does not resolve, lies in the standard
    library, or is not callable."""
    module = path.split(":", 1)[0].split(".", 1)[0]
    if module in sys.stdlib_module_names or module == "builtins":
        raise ConfigError(key, f"{path!r} is in Python's standard library; name a function of your "
                          "own code or of an installed package")
    try:
        function = pkgutil.resolve_name(path)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(key, f"cannot resolve {path!r}: {type(err).__name__}: {err} (a .py file "
                          "next to the config, or an installed module, is importable)") from None
    if not callable(function):
        raise ConfigError(key, f"{path!r} is a {type(function).__name__}, not a function")
    return function


def call_with_args(function: Callable[..., Any], path: str, key: str, args: Mapping[str, Any],
                   **given: Any) -> Any:
    """`function(**given, **args)`: arguments it does not accept are named (with those it does)
    before it runs; an exception inside it becomes `ConfigError(key)` with its last frame."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        signature = None
    if signature is not None:
        try:
            signature.bind(**given, **args)
        except TypeError as err:
            accepted = [n for n, p in signature.parameters.items()
                        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in given]
            unknown = sorted(set(args) - set(signature.parameters))
            what = (f"does not accept {unknown}" if unknown and not any(
                p.kind == p.VAR_KEYWORD for p in signature.parameters.values()) else str(err))
            raise ConfigError(f"{key.rsplit('.', 1)[0]}.args", f"{path} {what} (its arguments: "
                              f"{accepted}; it is called with {sorted(given)} and the args)") from None
    try:
        return function(**given, **args)
    except PipelineError:  # ours (a built-in source's missing file, say): already says what to do
        raise
    except Exception as err:  # noqa: BLE001 - any failure of the user's code is reported as such
        frame = traceback.extract_tb(err.__traceback__)[-1]
        raise ConfigError(key, f"{path}(...) raised {type(err).__name__}: {err} "
                          f"(at {frame.filename}:{frame.lineno})") from err
