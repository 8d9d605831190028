"""Exceptions raised by ocrconv. Every message is meant to be read by a person.

The CLI catches :class:`OcrconvError` and prints its message without a traceback.
"""
from __future__ import annotations


class OcrconvError(Exception):
    """Base class of every error ocrconv raises on purpose."""


class UnknownModelError(OcrconvError, KeyError):
    """A model name that is not in the manifest; the message lists the nearest names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DownloadError(OcrconvError):
    """A download failed (HTTP error, connection error after retries, offline cache miss)."""


class IntegrityError(DownloadError):
    """A downloaded or cached file does not match its recorded size or sha256."""


class UnsafeArchiveError(OcrconvError):
    """An archive member would escape the target directory or is not a regular file/directory."""


class CorruptArchiveError(OcrconvError):
    """An archive cannot be read (truncated, not a tar, bad member)."""


class UnsafeCheckpointError(OcrconvError):
    """A pickle asks for a global outside the allow-list; nothing from it was executed."""


class CorruptWeightsError(OcrconvError):
    """A weight file is malformed: the message names the file, the variable and the byte offset."""


class UnsupportedFormatError(OcrconvError):
    """A path holds no Paddle weights ocrconv can read, or an ambiguous set of them."""


class FamilyError(OcrconvError):
    """An unknown architecture family, or weights that belong to another family."""


class KeyMismatchError(FamilyError):
    """Converted weights do not match the PyTorch module: lists missing/unexpected keys with shapes."""


class DictionaryError(OcrconvError):
    """A character dictionary that does not fit the recognition head's class count."""


class ParityError(OcrconvError):
    """The parity check could not run (e.g. PaddlePaddle missing) or failed."""


class OutputError(OcrconvError):
    """An output cannot be written: it already exists (without --force) or the disk write failed."""
