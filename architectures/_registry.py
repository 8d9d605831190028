"""Name -> class registries for backbones, necks and heads, filled by a ``register`` decorator."""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, TypeVar

from architectures.errors import ConfigError

T = TypeVar("T")


class Registry(dict):
    """A ``dict[str, type]`` with a ``register`` decorator and a readable lookup error."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Class decorator: ``@BACKBONES.register()`` (class name) or ``@BACKBONES.register("Name")``."""

        def decorate(cls: T) -> T:
            key = name or cls.__name__
            if key in self and self[key] is not cls:
                raise ValueError(f"{self.kind} {key!r} is registered twice ({self[key]} and {cls})")
            self[key] = cls
            return cls

        return decorate

    def get_class(self, name: str):
        """The class registered under ``name``; ConfigError (a ValueError) listing the known names otherwise."""
        try:
            return self[name]
        except KeyError:
            raise ConfigError(f"unknown {self.kind} {name!r}; known: {sorted(self)}") from None


def import_submodules(package_name: str, package_path) -> None:
    """Import every module of a package so that their ``register`` decorators run."""
    for info in pkgutil.iter_modules(package_path):
        importlib.import_module(f"{package_name}.{info.name}")
