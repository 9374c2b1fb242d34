"""Extensions in a module of their own: a probe, an estimator or a method defined outside the
library registers itself when its module is imported. ``--plugin MODULE`` (``run``,
``reproduce``, ``evaluate``; repeatable) or the environment variable ``VI_PLUGINS``
(comma-separated module names) names such modules: the command imports them before it reads
the grid, and so does every worker process (``--jobs N``) and cluster job before it trains, so
a name a grid uses means the same thing everywhere.

    VI_PLUGINS=my_probes python -m experiments run my_grid.json --jobs 2
    python -m experiments run my_grid.json --jobs 2 --plugin my_probes

Commands that only read results (``check``, ``figures``, ``findings``) need no plugin: what a
run wrote is declared in the contract recorded with it (``vi.contract.record``).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
from collections.abc import Iterable, Iterator

__all__ = ["ENV", "PluginError", "exported", "load", "names"]

#: the environment variable naming the plugin modules (comma-separated)
ENV = "VI_PLUGINS"
_MODULE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


class PluginError(ValueError):
    """A plugin module that is not a module name or cannot be imported (one readable line)."""


def names(extra: Iterable[str] = ()) -> list[str]:
    """The plugin modules: those in ``VI_PLUGINS``, then ``extra``, each once."""
    listed = [n.strip() for n in os.environ.get(ENV, "").split(",") if n.strip()]
    out = list(dict.fromkeys([*listed, *(n.strip() for n in extra)]))
    bad = [n for n in out if not _MODULE.match(n)]
    if bad:
        raise PluginError(f"plugin {bad[0]!r} is not a module name (dotted Python identifiers, "
                          f"e.g. my_package.my_probes)")
    return out


def load(extra: Iterable[str] = ()) -> list[str]:
    """Import every plugin module (``names``); returns their names. A module that cannot be
    imported is a ``PluginError`` naming it and why."""
    modules = names(extra)
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as err:  # ImportError, or the module's own code raising
            raise PluginError(f"plugin {name!r} cannot be imported ({type(err).__name__}: "
                              f"{err}); it must be importable from this folder or PYTHONPATH"
                              ) from err
    return modules


@contextlib.contextmanager
def exported(modules: list[str]) -> Iterator[None]:
    """While the block runs, name ``modules`` (loaded plugins) in ``VI_PLUGINS``, so worker
    processes and cluster jobs started inside it import them too (``load``)."""
    before = os.environ.get(ENV)
    if modules:
        os.environ[ENV] = ",".join(modules)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before
