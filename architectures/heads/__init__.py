"""Head registry. Every module in this package registers its classes with ``HEADS.register``."""
from architectures._registry import Registry, import_submodules

HEADS = Registry("head")
register = HEADS.register

import_submodules(__name__, __path__)
