"""Backbone registry. Every module in this package registers its classes with ``BACKBONES.register``."""
from architectures._registry import Registry, import_submodules

BACKBONES = Registry("backbone")
register = BACKBONES.register

import_submodules(__name__, __path__)
