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
from architectures.errors import ConfigError, UnknownFamilyError
from architectures.families import classic as _classic
from architectures.heads import HEADS
from architectures.layers import clear_inference_caches
from architectures.model import DET_SIZE_MULTIPLE, OCRModel
from architectures.necks import NECKS

__all__ = ["BACKBONES", "NECKS", "HEADS", "FAMILIES", "OCRModel", "build", "family_config", "load_pretrained",
           "from_pretrained", "clear_inference_caches"]


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
    """A deep copy of the family's base config; dict overrides are merged recursively.

    An unknown name raises UnknownFamilyError (a ConfigError, a ValueError) listing the known families."""
    if name not in FAMILIES:
        raise UnknownFamilyError(f"unknown architecture family {name!r}; "
                                 f"known families: {', '.join(sorted(FAMILIES))}")
    return copy.deepcopy(_merge(FAMILIES[name], overrides))


def _section(config: dict, section: str, required: bool) -> dict | None:
    """``config[section]``: a dict with a ``name`` (None for an absent or empty optional section); ConfigError
    otherwise."""
    spec = config.get(section)
    if not spec and not required:
        return None
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        found = "missing" if spec is None else f"{spec!r}"
        raise ConfigError(f"the architecture config needs a {section!r} section, a dict with a 'name' and the "
                          f"module's arguments; {found} (sections present: {sorted(config)})")
    return spec


def _instantiate(registry, section: str, spec: dict, in_channels, form: str):
    kwargs = dict(spec)
    name = kwargs.pop("name")
    cls = registry.get_class(name)
    signature = inspect.signature(cls)
    if "form" in signature.parameters:
        kwargs.setdefault("form", form)  # build the deploy form directly instead of fusing fresh branches
    try:
        signature.bind(in_channels=in_channels, **kwargs)
    except TypeError as exc:
        accepted = ", ".join(p for p in signature.parameters if p != "in_channels")
        raise ConfigError(f"the config's {section} {name!r} does not fit the module: {exc} (it takes: {accepted})"
                          ) from None
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
    that load every parameter and buffer right after, with a strict state-dict load. A config that cannot be built
    (missing ``backbone`` / ``head`` section, unknown module name, arguments the module does not take) raises
    ConfigError; a ``"task": "det"`` model checks that input sides are multiples of 32.
    """
    form = config.get("form", "deploy")
    if form not in ("deploy", "train"):
        raise ConfigError(f"form must be 'deploy' or 'train', got {form!r}")
    with contextlib.nullcontext() if init_weights else _skip_weight_init():
        backbone = _instantiate(BACKBONES, "backbone", _section(config, "backbone", True),
                                config.get("in_channels", 3), form)
        channels = backbone.out_channels
        neck = None
        neck_spec = _section(config, "neck", False)
        if neck_spec:
            neck = _instantiate(NECKS, "neck", neck_spec, channels, form)
            channels = neck.out_channels
        head = _instantiate(HEADS, "head", _section(config, "head", True), channels, form)
        model = OCRModel(backbone, neck, head,
                         size_multiple=DET_SIZE_MULTIPLE if config.get("task") == "det" else None)
    if form == "deploy":
        model.reparameterize()
    return model.eval()


from architectures.pretrained import load_pretrained, from_pretrained  # noqa: E402  (pretrained imports build)
