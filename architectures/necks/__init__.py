"""Neck registry. Every module in this package registers its classes with ``NECKS.register``."""
from architectures._registry import Registry, import_submodules

NECKS = Registry("neck")
register = NECKS.register

import_submodules(__name__, __path__)
