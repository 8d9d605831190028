"""Exceptions raised by ``architectures`` on purpose; every message is meant to be read by a person.

Defined here, not in ocrconv's ``converter`` package: ``architectures`` needs only torch and safetensors.
"""
from __future__ import annotations


class ArchitectureError(Exception):
    """Base class of every error ``architectures`` raises on purpose."""


class ConfigError(ArchitectureError, ValueError):
    """An architecture config (``config.json`` or a family config) that cannot be built."""


class UnknownFamilyError(ConfigError):
    """A family name that ``FAMILIES`` does not know; the message lists the known ones."""


class ModelDirectoryError(ArchitectureError, FileNotFoundError):
    """A path that is not a directory written by ``ocrconv convert`` (or lacks one of its files)."""


class WeightsMismatchError(ArchitectureError):
    """``model.safetensors`` does not fit the architecture: lists missing and unexpected keys with shapes."""


class DictionaryMismatchError(ArchitectureError):
    """A character list (``dict.txt``) whose length does not fit the recognition head's class count."""


class DtypeRangeError(ArchitectureError, ValueError):
    """Weights that do not fit the requested dtype (values above its range, or non-finite values)."""
