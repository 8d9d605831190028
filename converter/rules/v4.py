"""Conversion rules of the PP-OCRv4 families (mobile / server, det / rec).

PPLCNetV3 (the mobile backbone) is re-parameterizable. Trained checkpoints hold its training form
(``conv_kxk.N``, ``conv_1x1``, ``identity`` branches), inference models the fused ``reparam_conv``:

* ``form="deploy"`` (default) from a trained checkpoint: the branches of every layer are fused in the state
  dict (float64 arithmetic, the function the model's own ``reparameterize()`` uses) into ``reparam_conv``
  (rule ``rep_fuse``), and the deploy form is built directly;
* ``form="train"`` from an inference model is impossible (a fused conv cannot be split into its branches):
  FamilyError.

Release inference models were exported from code that names the LearnableAffineBlocks ``<p>.w`` / ``<p>.b`` /
``<p>.activation.{scale,bias}`` instead of ``<p>.lab.{scale,bias}`` / ``<p>.act.lab.{scale,bias}``; both
spellings are renamed by named rules.
"""
from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from architectures.backbones.pplcnetv3 import fuse_rep_branches
from converter.errors import FamilyError
from converter.rules import ConversionContext, FamilyRules, State
from converter.rules.classic import CTC_CLASSES, DB_THRESHOLD

_LAYER = r"^(backbone\.blocks\d+\.\d+\.(?:dw|pw)_conv)"

# Release export spelling of PPLCNetV3's LearnableAffineBlocks -> public PaddleOCR spelling.
RELEASE_LAB_RENAMES = (
    ("release_lab_name", _LAYER + r"\.w$", r"\1.lab.scale"),
    ("release_lab_name", _LAYER + r"\.b$", r"\1.lab.bias"),
    ("release_act_lab_name", _LAYER + r"\.activation\.(scale|bias)$", r"\1.act.lab.\2"),
)

# Parameters that PaddleOCR's (or the release's) PPLCNetV3 creates but never runs.
LCNET_DROPS = (
    # release trained checkpoints: a hard-swish after conv1 that the forward pass never applies
    ("unused_conv1_hardswish", r"^backbone\.conv1\.hardswish\.(scale|bias)$"),
)
LCNET_DET_DROPS = (
    # the activation of the integer-stride-2 depthwise layers (first block of stages 3-6) is skipped
    ("unused_act_after_stride2", r"^backbone\.blocks[3-6]\.0\.dw_conv\.(act\.lab|activation)\.(scale|bias)$"),
)
LCNET_REC_DROPS = (
    # the release code's classification tail of the rec backbone (in its .info, never in the program)
    ("unused_rec_backbone_tail", r"^backbone\.(last_conv|hardswish|fc)\."),
)
# MultiHead's NRTR branch (guided training, "gtc") only trains; the inference program runs the CTC branch.
NRTR_DROPS = (
    ("nrtr_gtc_training_only", r"^head\.(gtc_head|before_gtc)\."),
)

_FUSED = re.compile(r"\.reparam_conv\.(weight|bias)$")
_BRANCHES = re.compile(r"\.(conv_kxk\.\d+|conv_1x1|identity)\.")
_BRANCH_KEY = re.compile(r"^(?P<layer>.+)\.(?:conv_kxk\.(?P<index>\d+)|(?P<branch>conv_1x1|identity))\."
                         r"(?P<param>(?:conv|bn)\.\w+|weight|bias|running_mean|running_var|_mean|_variance)$")
# BN tensor names: after the generic renames (PyTorch) and as Paddle stores them
_BN_PARAMS = ("weight", "bias", "running_mean", "running_var")
_PADDLE_BN_PARAMS = ("weight", "bias", "_mean", "_variance")


def select_rep_form(state: State, ctx: ConversionContext) -> State:
    """Build the PPLCNetV3 form that the weights hold; refuse to un-fuse an inference model.

    Training-form weights asked for in the deploy form are fused here (:func:`fuse_rep_state`).
    """
    fused = sorted(k for k in state if _FUSED.search(k))
    branches = sorted(k for k in state if _BRANCHES.search(k))
    if fused and branches:
        raise FamilyError(
            f"{ctx.family}: the weights mix the fused PPLCNetV3 form ({ctx.origin.get(fused[0], fused[0])}) "
            f"and the training branches ({ctx.origin.get(branches[0], branches[0])}); expected one of them")
    if fused and ctx.form == "train":
        raise FamilyError(
            f"{ctx.family}: cannot convert to the training form: these weights ({ctx.kind or 'inference'} "
            f"model) hold the fused PPLCNetV3 convolutions ({len(fused) // 2} reparam_conv layers, e.g. "
            f"{ctx.origin.get(fused[0], fused[0])}), and a fused convolution cannot be split back into its "
            f"conv_kxk / conv_1x1 / identity branches; convert the trained checkpoint (the *_train archive) "
            f"for fine-tuning, or drop the training form to get the deploy form")
    if branches and ctx.form == "deploy":
        return fuse_rep_state(state, ctx)
    return state


def fuse_rep_state(state: State, ctx: ConversionContext) -> State:
    """Replace every LearnableRepLayer's training branches by its fused ``reparam_conv`` (rule ``rep_fuse``).

    A layer's keys must be complete (each branch a conv weight plus four BN tensors, the identity four BN
    tensors); anything else is left in place and reported by the strict key check.
    """
    layers = _rep_layers(state, _BN_PARAMS)
    for layer, branches in layers.items():
        try:
            kernel, bias, first = _fuse_layer(state, branches, _BN_PARAMS)
        except (RuntimeError, IndexError) as exc:  # shapes that do not fit together
            shapes = ", ".join(f"{ctx.origin.get(key, key)} {list(state[key].shape)}"
                               for params in branches.values() for key in params.values())
            raise FamilyError(f"{ctx.family}: the training branches of {layer} cannot be fused ({exc}): "
                              f"{shapes}") from exc
        for name, value in (("weight", kernel), ("bias", bias)):
            state[f"{layer}.reparam_conv.{name}"] = value.numpy().astype(state[first].dtype)
            ctx.origin[f"{layer}.reparam_conv.{name}"] = (f"{ctx.origin.get(first)} "
                                                          f"(+ {len(branches) - 1} branch(es), fused)")
        for params in branches.values():
            for key in params.values():
                ctx.renamed.append((ctx.origin.pop(key, key), f"{layer}.reparam_conv", "rep_fuse"))
                del state[key]
    ctx.notes.append(f"rep_fuse: the weights hold PPLCNetV3's training branches; {len(layers)} layers were fused "
                     f"into reparam_conv (float64 arithmetic) and the deploy form was built")
    return state


def fused_program_params(checkpoint: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The ``<layer>.reparam_conv.{weight,bias}`` that PaddleOCR's export (``rep()``) puts into the inference
    program, computed from a trained checkpoint's branches (Paddle names, sub-model prefix removed)."""
    fused = {}
    for layer, branches in _rep_layers(checkpoint, _PADDLE_BN_PARAMS).items():
        kernel, bias, first = _fuse_layer(checkpoint, branches, _PADDLE_BN_PARAMS)
        dtype = checkpoint[first].dtype
        fused[f"{layer}.reparam_conv.weight"] = kernel.numpy().astype(dtype)
        fused[f"{layer}.reparam_conv.bias"] = bias.numpy().astype(dtype)
    return fused


def _rep_layers(state: Mapping[str, np.ndarray], bn_params: tuple[str, ...]) -> dict[str, dict[str, dict[str, str]]]:
    """layer -> branch -> parameter -> key, for the layers whose branches are complete (each branch a conv weight
    plus the four BN tensors ``bn_params``, the identity those four; at least one ``conv_kxk``)."""
    layers: dict[str, dict[str, dict[str, str]]] = {}
    for key in state:
        match = _BRANCH_KEY.match(key)
        if match:
            branch = f"conv_kxk.{match['index']}" if match["index"] is not None else match["branch"]
            layers.setdefault(match["layer"], {}).setdefault(branch, {})[match["param"]] = key
    wanted = {"identity": set(bn_params)}
    return {layer: branches for layer, branches in layers.items()
            if any(name.startswith("conv_kxk.") for name in branches)
            and all(set(params) == wanted.get(name, {"conv.weight", *(f"bn.{p}" for p in bn_params)})
                    for name, params in branches.items())}


def _fuse_layer(state: Mapping[str, np.ndarray], branches: dict[str, dict[str, str]],
                bn_params: tuple[str, ...]):
    """Kernel and bias (float64 tensors) of one layer's fused convolution, and the key of its first conv weight."""
    def bn(params: dict[str, str], prefix: str) -> tuple:
        return tuple(state[params[prefix + p]] for p in bn_params)

    kxk = sorted((name for name in branches if name.startswith("conv_kxk.")),
                 key=lambda name: int(name.removeprefix("conv_kxk.")))
    conv_1x1 = branches.get("conv_1x1")
    identity = branches.get("identity")
    kernel, bias = fuse_rep_branches(
        [(state[branches[name]["conv.weight"]], bn(branches[name], "bn.")) for name in kxk],
        (state[conv_1x1["conv.weight"]], bn(conv_1x1, "bn.")) if conv_1x1 else None,
        bn(identity, "") if identity else None)
    return kernel, bias, branches[kxk[0]]["conv.weight"]


def _lcnet_rules(family: str, drops: tuple, **extra) -> FamilyRules:
    return FamilyRules(family=family, prefixes=("Student.", ""), foreign_prefixes=("Teacher.",),
                       drops=LCNET_DROPS + drops, renames=RELEASE_LAB_RENAMES, transforms=(select_rep_form,),
                       program_params=(fused_program_params,), **extra)


RULES: dict[str, FamilyRules] = {
    "PP-OCRv4_mobile_det": _lcnet_rules("PP-OCRv4_mobile_det", LCNET_DET_DROPS, optional_branches=(DB_THRESHOLD,)),
    "PP-OCRv4_server_det": FamilyRules(family="PP-OCRv4_server_det", optional_branches=(DB_THRESHOLD,)),
    "PP-OCRv4_mobile_rec": _lcnet_rules("PP-OCRv4_mobile_rec", LCNET_REC_DROPS + NRTR_DROPS,
                                        class_count=CTC_CLASSES),
    "PP-OCRv4_server_rec": FamilyRules(family="PP-OCRv4_server_rec", drops=NRTR_DROPS, class_count=CTC_CLASSES),
}
