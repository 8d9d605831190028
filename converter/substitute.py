"""A trained checkpoint's own weights in the released inference program: the Paddle reference of its conversion.

A trained checkpoint is often another epoch than the one the release's inference model was exported from, so its
conversion cannot be checked against the released program as shipped. The program is run with the checkpoint's
weights put in instead, found the way PaddleOCR's export finds them: the converted sub-model's keys (its prefix
removed) under the program's structured names (``.pdiparams.info``), the release's own spellings of some names
(the family's renames, e.g. PP-OCRv4's ``<p>.w`` for ``<p>.lab.scale``), and the parameters the export derives
(``FamilyRules.program_params``: PPLCNetV3's fused convolutions, whose arithmetic the converter shares with
:func:`architectures.backbones.pplcnetv3.fuse_rep_branches`). Nothing of the PyTorch side (its names,
transposes, LSTM layout, dropped heads, batch-norm handling) is used, so the comparison still tests the
conversion. Pure numpy: Paddle runs the result in :mod:`converter.parity`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from converter.rules import RULES

_LISTED = 10


@dataclass
class Substitution:
    """Checkpoint arrays for the program's parameters (Paddle var name -> array) and how they were found.

    ``unresolved``: the program parameters the checkpoint does not give (``"name [shape]: why"``); the
    substitution is usable only when there are none (:attr:`complete`).
    """

    submodel: str
    values: dict[str, np.ndarray] = field(default_factory=dict)
    by_name: int = 0
    release_spelling: int = 0
    derived: int = 0
    unresolved: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return bool(self.values) and not self.unresolved

    def summary(self) -> dict:
        """What parity.json records of the substitution."""
        found = (f"{self.by_name} by name, {self.release_spelling} under the release's spelling, "
                 f"{self.derived} derived as the export does")
        return {"substituted": self.complete, "submodel": self.submodel.rstrip(".") or None,
                "parameters": len(self.values) + len(self.unresolved), "found": found,
                "unresolved": self.unresolved[:_LISTED], "unresolved_count": len(self.unresolved)}


def checkpoint_in_program(checkpoint: Mapping[str, np.ndarray], program_weights, family: str,
                          submodel: str = "") -> Substitution:
    """The arrays of ``checkpoint``'s sub-model ``submodel`` (a key prefix such as ``"Student."``, "" for plain
    keys) for every parameter of the inference program read as ``program_weights`` (a
    :class:`converter.paddle_io.PaddleWeights` of kind inference); see the module docstring."""
    rules = RULES[family]
    own = {key[len(submodel):]: array for key, array in checkpoint.items() if key.startswith(submodel)}
    derived: dict[str, np.ndarray] = {}
    for derive in rules.program_params:
        derived.update(derive(own))
    renames = [(re.compile(pattern), replacement) for _, pattern, replacement in rules.renames]
    result = Substitution(submodel=submodel)
    for name, var in program_weights.param_names.items():
        stored = program_weights[name]
        public = name
        for pattern, replacement in renames:
            public = pattern.sub(replacement, public)
        if name in own:
            value, counter = own[name], "by_name"
        elif public in own:
            value, counter = own[public], "release_spelling"
        elif name in derived:
            value, counter = derived[name], "derived"
        else:
            result.unresolved.append(f"{name} {list(stored.shape)}: no {submodel}{name}"
                                     + (f" or {submodel}{public}" if public != name else "") + " in the checkpoint")
            continue
        value = np.asarray(value)
        if value.dtype != stored.dtype and value.dtype.kind == stored.dtype.kind == "f":
            value = value.astype(stored.dtype)  # a float16 / float64 checkpoint, in the program's float type
        if value.shape != stored.shape or value.dtype != stored.dtype:
            result.unresolved.append(f"{name} {list(stored.shape)} {stored.dtype.name}: the checkpoint has "
                                     f"{list(value.shape)} {value.dtype.name}")
            continue
        result.values[var] = value
        setattr(result, counter, getattr(result, counter) + 1)
    return result


def release_submodels(checkpoint: Mapping[str, np.ndarray], program_weights, family: str,
                      rtol: float = 1e-5) -> dict[str, bool] | None:
    """For each sub-model of a distillation ``checkpoint``, whether it holds the released program's own weights
    (each tensor within ``rtol`` of its largest magnitude, which covers fused convolutions computed in float64);
    None when the checkpoint has no sub-model prefixes. Tells, e.g., whether a CML release was exported from
    Student or Student2."""
    keys = list(checkpoint)
    prefixes = [p for p in RULES[family].selectable() if p and any(k.startswith(p) for k in keys)]
    if not prefixes:
        return None
    released = {var: program_weights[name] for name, var in program_weights.param_names.items()}
    holds = {}
    for prefix in prefixes:
        plan = checkpoint_in_program(checkpoint, program_weights, family, prefix)
        holds[prefix.rstrip(".")] = plan.complete and all(_same(value, released[var], rtol)
                                                          for var, value in plan.values.items())
    return holds


def _same(value: np.ndarray, released: np.ndarray, rtol: float) -> bool:
    if not value.size:
        return True
    difference = np.abs(value.astype(np.float64) - released).max()
    return bool(difference <= rtol * max(float(np.abs(released).max()), 1.0))
