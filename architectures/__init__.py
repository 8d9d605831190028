"""PyTorch ports of PaddleOCR's architectures.

``build(config)`` composes backbone -> neck -> head like PaddleOCR's BaseModel; ``FAMILIES`` holds the
base config of every supported family; ``family_config(name, **overrides)`` returns a deep copy.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import inspect

import torch

from architectures.backbones import BACKBONES
from architectures.families import classic as _classic
from architectures.heads import HEADS
from architectures.model import OCRModel
from architectures.necks import NECKS

__all__ = ["BACKBONES", "NECKS", "HEADS", "FAMILIES", "OCRModel", "build", "family_config", "load_pretrained",
           "from_pretrained"]


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


def _instantiate(registry, spec: dict, in_channels, form: str):
    kwargs = dict(spec)
    cls = registry.get_class(kwargs.pop("name"))
    if "form" in inspect.signature(cls).parameters:
        kwargs.setdefault("form", form)  # build the deploy form directly instead of fusing fresh branches
    return cls(in_channels=in_channels, **kwargs)


_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "xavier_uniform_",
                   "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_")


@contextlib.contextmanager
def _skip_weight_init():
    """Make torch.nn.init's fill functions no-ops while modules are constructed (their values get overwritten)."""
    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS}
    try:
        for name in _INIT_FUNCTIONS:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def build(config: dict, *, init_weights: bool = True) -> OCRModel:
    """Build the model described by ``config`` (see FAMILIES), in eval mode.

    With ``form == "deploy"`` (the default) re-parameterizable modules are built in (or switched to) their deploy
    form. ``init_weights=False`` skips torch's random initialisation (parameters hold arbitrary values): for callers
    that load every parameter and buffer right after, with a strict state-dict load.
    """
    form = config.get("form", "deploy")
    if form not in ("deploy", "train"):
        raise ValueError(f"form must be 'deploy' or 'train', got {form!r}")
    with contextlib.nullcontext() if init_weights else _skip_weight_init():
        backbone = _instantiate(BACKBONES, config["backbone"], config.get("in_channels", 3), form)
        channels = backbone.out_channels
        neck = None
        if config.get("neck"):
            neck = _instantiate(NECKS, config["neck"], channels, form)
            channels = neck.out_channels
        head = _instantiate(HEADS, config["head"], channels, form)
        model = OCRModel(backbone, neck, head)
    if form == "deploy":
        model.reparameterize()
    return model.eval()


from architectures.pretrained import load_pretrained, from_pretrained  # noqa: E402  (pretrained imports build)
