"""PyTorch ports of PaddleOCR's architectures.

``build(config)`` composes backbone -> neck -> head like PaddleOCR's BaseModel; ``FAMILIES`` holds the
base config of every supported family; ``family_config(name, **overrides)`` returns a deep copy.
"""
from __future__ import annotations

import copy
import importlib

from architectures.backbones import BACKBONES
from architectures.families import classic as _classic
from architectures.heads import HEADS
from architectures.model import OCRModel
from architectures.necks import NECKS

__all__ = ["BACKBONES", "NECKS", "HEADS", "FAMILIES", "OCRModel", "build", "family_config"]


def _collect_families() -> dict[str, dict]:
    families: dict[str, dict] = {}
    sources = [_classic]
    try:
        sources.append(importlib.import_module("architectures.families.v4"))
    except ModuleNotFoundError as exc:
        if exc.name != "architectures.families.v4":
            raise
    for module in sources:
        for name, config in module.FAMILIES.items():
            if name in families:
                raise ValueError(f"family {name!r} is defined twice (second time in {module.__name__})")
            families[name] = {"family": name, "form": "deploy", **config}
    return families


FAMILIES: dict[str, dict] = _collect_families()


def _merge(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def family_config(name: str, **overrides) -> dict:
    """A deep copy of the family's base config; dict overrides are merged recursively."""
    if name not in FAMILIES:
        from converter.errors import FamilyError

        raise FamilyError(f"unknown architecture family {name!r}; known families: {', '.join(sorted(FAMILIES))}")
    return copy.deepcopy(_merge(FAMILIES[name], overrides))


def _instantiate(registry, spec: dict, in_channels):
    kwargs = dict(spec)
    cls = registry.get_class(kwargs.pop("name"))
    return cls(in_channels=in_channels, **kwargs)


def build(config: dict) -> OCRModel:
    """Build the model described by ``config`` (see FAMILIES), in eval mode.

    With ``form == "deploy"`` (the default) re-parameterizable modules are switched to their deploy form.
    """
    backbone = _instantiate(BACKBONES, config["backbone"], config.get("in_channels", 3))
    channels = backbone.out_channels
    neck = None
    if config.get("neck"):
        neck = _instantiate(NECKS, config["neck"], channels)
        channels = neck.out_channels
    head = _instantiate(HEADS, config["head"], channels)
    model = OCRModel(backbone, neck, head)
    if config.get("form", "deploy") == "deploy":
        model.reparameterize()
    elif config["form"] != "train":
        raise ValueError(f"form must be 'deploy' or 'train', got {config['form']!r}")
    return model.eval()
from architectures.pretrained import load_pretrained, from_pretrained  # noqa: E402  (owner E)
