"""PaddleOCR character dictionaries: the vendored files, PaddleOCR's parsing, and class-count resolution.

The dictionary files are vendored byte for byte from the ``paddleocr`` wheels under
``converter/data/dicts/ppocr/utils/...`` (Apache-2.0, see LICENSE/NOTICE there) and indexed with their
sha256 in ``index.json``.

A CTC head has ``1 (blank) + len(characters) + (1 if use_space_char)`` classes. Which characters depends
on the PaddleOCR version the model was trained with: the 2.0-era decoder concatenated every line and split
the result into code points, later versions take one line per class. :func:`resolve` accepts a head size
``N`` in ``{L+1, L+2, C+1, C+2}`` (``L`` lines, ``C`` code points), records which one matched and refuses
anything else.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable

from converter.errors import DictionaryError

log = logging.getLogger(__name__)

DICT_ROOT = Path(__file__).resolve().parent / "data" / "dicts"
BLANK_INDEX = 0
MODES = ("lines", "code_points")
# The vendored dictionaries whose models' use_space_char flipped between PaddleOCR commits (REFERENCE.md). Every
# other release model was trained with the space class, so for those dictionaries a reading with the space wins a
# tie (e.g. ru_dict: a head of 127 is 125 lines + space, not 126 code points without it).
SPACE_FLAG_VARIES = frozenset(f"ppocr/utils/dict/{lang}_dict.txt" for lang in ("french", "german", "japan", "korean"))


@dataclass(frozen=True)
class DictionaryFile:
    """One vendored dictionary: its path under ``ppocr/utils``, sha256, line and code-point counts, origin."""

    name: str
    sha256: str
    lines: int
    code_points: int
    source: str

    @property
    def path(self) -> Path:
        """Location of the vendored file."""
        return DICT_ROOT / self.name


@dataclass
class ResolvedDictionary:
    """The character list a recognition head was trained with (class ``i + 1`` is ``characters[i]``)."""

    characters: list[str]
    mode: str
    use_space_char: bool
    reverse: bool
    source: str
    sha256: str
    alternatives: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        """Head size: the blank plus every character."""
        return len(self.characters) + 1

    def postprocess_facts(self) -> dict:
        """What a CTC decoder needs, for config.json's ``postprocess`` section."""
        return {
            "name": "CTCLabelDecode",
            "blank_index": BLANK_INDEX,
            "num_classes": self.num_classes,
            "character_dict": "dict.txt",
            "dict_source": self.source,
            "dict_sha256": self.sha256,
            "dict_parsing": self.mode,
            "use_space_char": self.use_space_char,
            "reverse": self.reverse,
        }


@lru_cache(maxsize=1)
def vendored() -> dict[str, DictionaryFile]:
    """Every vendored dictionary, keyed by its path under the wheel (``ppocr/utils/dict/french_dict.txt``)."""
    index = json.loads((DICT_ROOT / "index.json").read_text(encoding="utf-8"))
    return {name: DictionaryFile(name=name, **entry) for name, entry in index.items()}


def canonical_name(name: str) -> str:
    """Map the spellings used in manifests and docs to the index key.

    ``dict/french_dict.txt``, ``ppocr/utils/dict/french_dict.txt``, ``paddleocr/ppocr/utils/dict/french_dict.txt``,
    ``french_dict.txt`` and ``french_dict`` all name ``ppocr/utils/dict/french_dict.txt``.
    """
    key = name.strip().replace("\\", "/")
    for prefix in ("paddleocr/", "ppocr/utils/", "utils/"):
        if key.startswith(prefix):
            key = key[len(prefix):]
    if not key.endswith(".txt"):
        key += ".txt"
    table = vendored()
    for candidate in (f"ppocr/utils/{key}", f"ppocr/utils/dict/{key}"):
        if candidate in table:
            return candidate
    import difflib

    nearest = difflib.get_close_matches(f"ppocr/utils/dict/{key}", list(table), n=3, cutoff=0.5)
    raise DictionaryError(
        f"no vendored dictionary named {name!r} under {DICT_ROOT}"
        + (f"; nearest: {', '.join(nearest)}" if nearest else f"; known: {', '.join(sorted(table))}")
    )


def parse_lines(data: bytes) -> list[str]:
    """Split a dictionary file the way PaddleOCR does (``readlines`` on bytes, strip ``\\n`` and ``\\r\\n``)."""
    parts = data.split(b"\n")
    if parts and parts[-1] == b"":
        parts.pop()
    try:
        return [part.decode("utf-8").strip("\n").strip("\r\n") for part in parts]
    except UnicodeDecodeError as exc:
        raise DictionaryError(f"dictionary is not UTF-8 at byte {exc.start}: {exc.reason}") from exc


def load_vendored(name: str) -> tuple[list[str], DictionaryFile]:
    """Lines of a vendored dictionary, checked against the sha256 in the index."""
    entry = vendored()[canonical_name(name)]
    data = entry.path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry.sha256:
        raise DictionaryError(f"{entry.path}: sha256 {digest} does not match the index ({entry.sha256}); reinstall ocrconv")
    return parse_lines(data), entry


def _candidates(lines: list[str], prefer: str, prefer_space: bool) -> list[tuple[str, bool, int]]:
    """``(mode, space, number of characters)`` for every way to read ``lines``: ``prefer``'s mode first, and with
    ``prefer_space`` every reading with the space class before those without it."""
    sizes = {"lines": len(lines), "code_points": sum(map(len, lines))}
    order = [prefer] + [m for m in MODES if m != prefer]
    candidates = [(mode, space, sizes[mode] + space) for mode in order for space in (False, True)]
    return sorted(candidates, key=lambda c: not c[1]) if prefer_space else candidates


def _characters(lines: list[str], mode: str, space: bool) -> list[str]:
    return (list(lines) if mode == "lines" else list("".join(lines))) + ([" "] if space else [])


def resolve(lines: list[str], num_classes: int, *, source: str, sha256: str, prefer: str = "lines",
            prefer_space: bool = False, reverse: bool | None = None) -> ResolvedDictionary:
    """Pick the parsing mode and space flag that give a CTC head of ``num_classes`` classes.

    When several readings fit with different character lists, ``prefer_space`` (the dictionary's models were
    always trained with the space class) picks one with the space first, then ``prefer`` (``code_points`` for
    2.0-era models) picks the mode. ``reverse`` defaults to PaddleOCR's rule (the dictionary path contains
    ``arabic``).
    """
    if prefer not in MODES:
        raise ValueError(f"prefer must be one of {MODES}, not {prefer!r}")
    matches = [(mode, space, _characters(lines, mode, space))
               for mode, space, count in _candidates(lines, prefer, prefer_space) if count + 1 == num_classes]
    if not matches:
        n_lines, n_points = len(lines), len("".join(lines))
        raise DictionaryError(
            f"dictionary {source} ({n_lines} lines, {n_points} code points) does not fit a head of {num_classes} "
            f"classes: accepted sizes are {n_lines + 1} / {n_lines + 2} (one class per line, without / with space) "
            f"and {n_points + 1} / {n_points + 2} (code points)"
        )
    mode, space, chars = matches[0]
    alternatives = [f"{m}{' + space' if s else ''}" for m, s, c in matches[1:] if c != chars]
    if alternatives:
        log.warning("dictionary %s fits %d classes in more than one way; using %s%s (also possible: %s)",
                    source, num_classes, mode, " + space" if space else "", ", ".join(alternatives))
    if reverse is None:
        reverse = "arabic" in source
    return ResolvedDictionary(characters=chars, mode=mode, use_space_char=space, reverse=reverse,
                              source=source, sha256=sha256, alternatives=alternatives)


def preferred_mode(family: str | None) -> str:
    """``code_points`` for the 2.0-era families (their training code split the dictionary into code points)."""
    return "code_points" if family and "v2.0" in family else "lines"


def resolve_for_head(dictionary: str | os.PathLike, num_classes: int, family: str | None = None, *,
                     vendored_only: bool = False) -> ResolvedDictionary:
    """Resolve a local dictionary file or a vendored dictionary name against a head size (``vendored_only``: the
    name is never taken for a path, as for a manifest row's dictionary)."""
    path = Path(dictionary)
    if not vendored_only and path.is_file():
        data = path.read_bytes()
        lines, source, digest = parse_lines(data), str(path), hashlib.sha256(data).hexdigest()
    else:
        lines, entry = load_vendored(str(dictionary))
        source, digest = entry.name, entry.sha256
    return resolve(lines, num_classes, source=source, sha256=digest, prefer=preferred_mode(family),
                   prefer_space=_always_with_space(digest))


def _always_with_space(sha256: str) -> bool:
    """True for the bytes of a vendored dictionary whose release models all have the space class (see
    SPACE_FLAG_VARIES), whatever the file is called."""
    return any(entry.sha256 == sha256 and name not in SPACE_FLAG_VARIES for name, entry in vendored().items())


def guess_for_head(num_classes: int, family: str | None = None,
                   candidates: Iterable[str] | None = None) -> ResolvedDictionary:
    """The single dictionary among ``candidates`` (default: every vendored one) that fits ``num_classes``.

    For local files without a manifest row; the pipeline passes the dictionaries of the family's manifest rows.
    """
    fits = []
    names = sorted({canonical_name(c) for c in candidates}) if candidates is not None else list(vendored())
    for name in names:
        lines, entry = load_vendored(name)
        try:
            fits.append(resolve(lines, num_classes, source=entry.name, sha256=entry.sha256,
                                prefer=preferred_mode(family), prefer_space=_always_with_space(entry.sha256)))
        except DictionaryError:
            continue
    if len(fits) != 1:
        found = ", ".join(f.source for f in fits) if fits else "none"
        raise DictionaryError(
            f"cannot tell which dictionary belongs to a head of {num_classes} classes (vendored dictionaries that fit: "
            f"{found}); pass one with --dict"
        )
    return fits[0]


def write_dict_txt(characters: list[str], path: Path) -> None:
    """Write the resolved character list, one class per line (class ``i + 1`` on line ``i``)."""
    bad = [c for c in characters if "\n" in c]
    if bad:
        raise DictionaryError(f"characters {bad!r} contain a newline and cannot be written one per line")
    path.write_text("".join(c + "\n" for c in characters), encoding="utf-8", newline="\n")

