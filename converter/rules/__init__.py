"""Paddle -> PyTorch key-mapping engine.

Each family's mapping is data (:class:`FamilyRules`) plus a few small named functions. ``convert()`` runs
the same pipeline for every family and every artifact kind (trained checkpoint or inference model):

1. pick the sub-model by prefix (``Student.``, ``student_model.``, none ...) and strip it; keys of the
   other sub-models (Teacher, Student2 ...) are dropped by the named rule ``other_submodel``;
2. family drops ``(rule_name, regex)``: training-only branches (SAR head, ...);
3. family renames ``(rule_name, regex, replacement)``, applied in order, then the generic
   ``bn_running_stats`` rename (``_mean`` -> ``running_mean``, ``_variance`` -> ``running_var``);
4. family transforms ``fn(state, ctx) -> state`` (e.g. :func:`merge_lstm_aliases`, PPLCNetV3's branch fusion);
5. class count read from the checkpoint's head (never hard-coded per language), optional branches
   switched off when the weights do not carry them (e.g. the DB threshold branch of inference models);
6. ``architectures.build(config)`` on the ``meta`` device (shapes only: no memory, no initialisation);
   2-D weights of ``nn.Linear`` modules (found by module type) are transposed from Paddle's [in, out];
   BatchNorm ``num_batches_tracked`` buffers are added (rule ``bn_num_batches_tracked``);
7. every key must match the model exactly (names and shapes), else :class:`KeyMismatchError`; the state dict
   shares memory with the checkpoint's arrays (copied only when re-typed or read-only; a transposed Linear
   weight is a non-contiguous view). ``Conversion.model`` loads it (``load_state_dict(strict=True,
   assign=True)``) into the meta-device model on first use.

Nothing is ignored silently: a key is either mapped, or dropped by a named rule (listed in
``Conversion.dropped``), or the conversion fails.
"""
from __future__ import annotations

import copy
import difflib
import importlib
import logging
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import torch
from torch import nn

import architectures
from converter.errors import FamilyError, KeyMismatchError

logger = logging.getLogger(__name__)

__all__ = [
    "ClassCount", "OptionalBranch", "FamilyRules", "ConversionContext", "Conversion", "RULES", "convert",
    "map_keys", "detect_family", "merge_lstm_aliases",
]

State = dict[str, np.ndarray]


@dataclass(frozen=True)
class ClassCount:
    """Where the class count lives: ``keys`` (PyTorch names, first present wins; its dim 0 is the count)
    and ``config_path`` inside the architecture config (e.g. ``("head", "out_channels")``)."""

    config_path: tuple[str, ...]
    keys: tuple[str, ...]


@dataclass(frozen=True)
class OptionalBranch:
    """A sub-module the weights may lack (e.g. the DB threshold branch of an inference model).

    When no key matches ``key_pattern`` (PyTorch names), ``config_path`` is set to False before build.
    """

    name: str
    config_path: tuple[str, ...]
    key_pattern: str


@dataclass(frozen=True)
class FamilyRules:
    """The key-mapping rules of one family, as data.

    ``prefixes``: accepted sub-model prefixes in preference order ("" = un-prefixed keys).
    ``alternates``: other sub-model prefixes with the same architecture, selectable with ``submodel=``.
    ``foreign_prefixes``: prefixes of sub-models that are never converted (e.g. a Teacher of another
    architecture); their keys, like those of every unselected sub-model, go by rule ``other_submodel``.
    ``drops``: ``(rule_name, regex)`` on stripped Paddle names. ``renames``: ``(rule_name, regex,
    replacement)`` applied in order. ``transforms``: ``fn(state, ctx) -> state`` run after the renames.
    ``submodel_configs``: for a selectable sub-model of another architecture (e.g. a distillation Teacher),
    prefix -> config sections (``backbone`` / ``neck`` / ``head`` ...) that replace the family's.
    ``program_params``: ``fn(checkpoint) -> {structured name: array}`` giving inference-program parameters that a
    trained checkpoint (Paddle names, sub-model prefix removed) holds in another form, as PaddleOCR's export
    derives them (e.g. PPLCNetV3's fused convolutions); used to run the released program with a checkpoint's
    weights (:mod:`converter.substitute`).
    """

    family: str
    prefixes: tuple[str, ...] = ("",)
    alternates: tuple[str, ...] = ()
    foreign_prefixes: tuple[str, ...] = ()
    drops: tuple[tuple[str, str], ...] = ()
    renames: tuple[tuple[str, str, str], ...] = ()
    transforms: tuple[Callable[[State, "ConversionContext"], State], ...] = ()
    class_count: ClassCount | None = None
    optional_branches: tuple[OptionalBranch, ...] = ()
    submodel_configs: Mapping[str, Mapping] = field(default_factory=dict)
    program_params: tuple[Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]], ...] = ()

    def selectable(self) -> tuple[str, ...]:
        """Prefixes ``convert(submodel=...)`` accepts."""
        return (*self.prefixes, *self.alternates, *self.submodel_configs)

    def known_prefixes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p for p in (*self.selectable(), *self.foreign_prefixes) if p))


@dataclass
class ConversionContext:
    """What transforms see and record: the family, the artifact kind, the config being built."""

    family: str
    kind: str | None
    form: str
    config: dict
    prefix: str = ""
    dropped: list[tuple[str, tuple[int, ...], str]] = field(default_factory=list)
    renamed: list[tuple[str, str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    origin: dict[str, str] = field(default_factory=dict)

    def drop(self, key: str, array: np.ndarray, rule: str) -> None:
        """Record that ``key`` (current name) was dropped by ``rule``."""
        self.dropped.append((self.origin.pop(key, key), tuple(np.shape(array)), rule))

    def rename(self, old: str, new: str, rule: str) -> None:
        """Record that ``old`` (current name) is now ``new``."""
        source = self.origin.pop(old, old)
        self.origin[new] = source
        self.renamed.append((source, new, rule))


@dataclass
class Conversion:
    """Result of :func:`convert`: the PyTorch ``state_dict`` and what the rules did.

    ``submodel`` is the sub-model prefix of the checkpoint keys that were converted ("" for plain weights).
    ``model`` is the PyTorch model holding ``state_dict`` (same memory); it is loaded on first use, since
    writing the weights needs only the state dict.
    """

    state_dict: dict[str, torch.Tensor]
    config: dict
    dropped: list[tuple[str, tuple[int, ...], str]]
    renamed: list[tuple[str, str, str]]
    notes: list[str]
    transposed: list[str]
    added: list[tuple[str, str]]
    submodel: str = ""
    _model: nn.Module = field(repr=False, default=None)
    _loaded: bool = field(repr=False, default=False)

    @property
    def model(self) -> nn.Module:
        """The model (built on the meta device at conversion), its tensors replaced by ``state_dict``'s."""
        if not self._loaded:
            self._model.load_state_dict(self.state_dict, strict=True, assign=True)
            unloaded = [name for name, t in (*self._model.named_parameters(), *self._model.named_buffers())
                        if t.is_meta]
            if unloaded:  # an architecture bug: a tensor outside the state dict (non-persistent buffer)
                raise RuntimeError(f"{self.config.get('family')}: the architecture holds tensors that no state-dict "
                                   f"key fills: {', '.join(unloaded[:10])}")
            self._loaded = True
        return self._model


# ----------------------------------------------------------------------------------------------------
# Reusable named transforms


_LSTM_ALIAS = re.compile(
    r"^(?P<base>.*)\.(?P<layer>\d+)\.cell_(?P<dir>fw|bw)\.(?P<param>weight_ih|weight_hh|bias_ih|bias_hh)$")


def merge_lstm_aliases(state: State, ctx: ConversionContext) -> State:
    """Paddle's LSTM lists each tensor twice (``lstm.weight_ih_l0`` and ``lstm.0.cell_fw.weight_ih``).

    The ``cell_fw``/``cell_bw`` spelling is renamed to torch's ``weight_ih_l{n}[_reverse]``; when both
    spellings are present they must be identical (else FamilyError) and the alias is dropped by rule
    ``lstm_duplicate_alias``. Inference ``.info`` files only carry the cell names.
    """
    for key in list(state):
        match = _LSTM_ALIAS.match(key)
        if not match:
            continue
        suffix = "_reverse" if match["dir"] == "bw" else ""
        target = f"{match['base']}.{match['param']}_l{match['layer']}{suffix}"
        array = state.pop(key)
        if target in state:
            other = state[target]
            if other.shape != array.shape or not np.array_equal(other, array):
                raise FamilyError(
                    f"{ctx.family}: the two spellings of one LSTM tensor disagree: {ctx.origin.get(key, key)} "
                    f"{tuple(array.shape)} vs {ctx.origin.get(target, target)} {tuple(other.shape)}"
                    + ("" if other.shape != array.shape else
                       f" (max |diff| {float(np.max(np.abs(other.astype(np.float64) - array))):.3g})"))
            ctx.drop(key, array, "lstm_duplicate_alias")
        else:
            state[target] = array
            ctx.rename(key, target, "lstm_cell_alias")
    return state


# ----------------------------------------------------------------------------------------------------
# Registry


def _collect_rules() -> dict[str, FamilyRules]:
    rules: dict[str, FamilyRules] = {}
    for module_name in ("converter.rules.classic", "converter.rules.v4"):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        for family, family_rules in module.RULES.items():
            if family in rules:
                raise ValueError(f"rules for {family!r} are defined twice (second time in {module_name})")
            rules[family] = family_rules
    return rules


_GENERIC_RENAMES = (
    ("bn_running_stats", r"\._mean$", ".running_mean"),
    ("bn_running_stats", r"\._variance$", ".running_var"),
)


# ----------------------------------------------------------------------------------------------------
# Pipeline


def _select_prefix(keys: list[str], rules: FamilyRules, submodel: str | None) -> str:
    known = rules.known_prefixes()
    present = sorted({p for p in known if any(k.startswith(p) for k in keys)})
    present_names = [p.rstrip(".") for p in present] or "none"
    if submodel is not None:
        wanted = submodel if submodel.endswith(".") or submodel == "" else submodel + "."
        selectable = [p for p in rules.selectable() if p]
        if wanted and wanted not in selectable:  # "student2" for "Student2."
            wanted = next((p for p in selectable if p.lower() == wanted.lower()), wanted)
        names = [p.rstrip(".") for p in selectable]
        if wanted and wanted not in selectable:
            why = ("its architecture is not known to ocrconv" if wanted in rules.foreign_prefixes
                   else "not a sub-model of this family")
            raise FamilyError(f"{rules.family}: sub-model {submodel!r} cannot be converted ({why}); "
                              f"selectable: {names or 'none'}")
        if wanted and wanted not in present:
            raise FamilyError(f"{rules.family}: the weights have no sub-model {submodel!r} "
                              f"(sub-model prefixes present: {present_names})")
        if not wanted and keys and all(k.startswith(known) for k in keys):
            raise FamilyError(f"{rules.family}: the weights have no un-prefixed keys, only sub-models "
                              f"{present_names}; choose one of them")
        return wanted
    for prefix in rules.prefixes:
        if prefix == "":
            if any(not k.startswith(known) for k in keys):
                return ""
        elif prefix in present:
            return prefix
    raise FamilyError(
        f"{rules.family}: found none of the expected sub-models {[p or '<no prefix>' for p in rules.prefixes]}; "
        f"sub-model prefixes present: {present_names}")


def select_submodel(weights: Mapping[str, np.ndarray], family: str, submodel: str | None = None) -> str:
    """The key prefix of the sub-model :func:`convert` takes from ``weights`` ("" for plain keys); FamilyError
    when ``submodel`` is not a sub-model of the family present in the weights."""
    return _select_prefix(list(weights), _family_rules(family), submodel)


def _family_rules(family: str) -> FamilyRules:
    if family not in RULES:
        raise FamilyError(f"no conversion rules for family {family!r}; known families: {', '.join(sorted(RULES))}")
    return RULES[family]


def _set_path(config: dict, path: tuple[str, ...], value) -> None:
    node = config
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value


def map_keys(weights: Mapping[str, np.ndarray], rules: FamilyRules, ctx: ConversionContext,
             submodel: str | None = None) -> State:
    """Steps 1-5 of the pipeline: Paddle names -> PyTorch names (no model needed); updates ``ctx.config``."""
    keys = [k for k in weights]
    ctx.prefix = _select_prefix(keys, rules, submodel)
    if ctx.prefix in rules.submodel_configs:
        ctx.config.update(copy.deepcopy(dict(rules.submodel_configs[ctx.prefix])))
        ctx.notes.append(f"sub-model {ctx.prefix.rstrip('.')}: architecture "
                         + " / ".join(str((ctx.config.get(part) or {}).get("name", "-"))
                                      for part in ("backbone", "neck", "head")))
    known = rules.known_prefixes()
    drops = [(name, re.compile(pattern)) for name, pattern in rules.drops]
    renames = [(name, re.compile(pattern), repl) for name, pattern, repl in (*rules.renames, *_GENERIC_RENAMES)]
    state: State = {}
    for key in keys:
        array = np.asarray(weights[key])
        if ctx.prefix:
            if not key.startswith(ctx.prefix):
                if key.startswith(known):
                    ctx.dropped.append((key, tuple(array.shape), "other_submodel"))
                    continue
                state[key] = array  # no sub-model prefix at all: reported as unexpected later
                ctx.origin[key] = key
                continue
            name = key[len(ctx.prefix):]
        else:
            if known and key.startswith(known):
                ctx.dropped.append((key, tuple(array.shape), "other_submodel"))
                continue
            name = key
        rule = next((rule_name for rule_name, pattern in drops if pattern.search(name)), None)
        if rule is not None:
            ctx.dropped.append((key, tuple(array.shape), rule))
            continue
        for rule_name, pattern, repl in renames:
            new = pattern.sub(repl, name)
            if new != name:
                ctx.renamed.append((key, new, rule_name))
                name = new
        if name in state:
            raise FamilyError(f"{rules.family}: two checkpoint keys map to {name!r}: {ctx.origin[name]} and {key}")
        state[name] = array
        ctx.origin[name] = key
    for transform in rules.transforms:
        state = transform(state, ctx)
    if rules.class_count is not None:
        key = next((k for k in rules.class_count.keys if k in state), None)
        if key is not None:
            count = int(state[key].shape[0])
            _set_path(ctx.config, rules.class_count.config_path, count)
            ctx.notes.append(f"class count {count} read from {ctx.origin.get(key, key)} {tuple(state[key].shape)}")
    for branch in rules.optional_branches:
        pattern = re.compile(branch.key_pattern)
        if not any(pattern.search(k) for k in state):
            _set_path(ctx.config, branch.config_path, False)
            ctx.notes.append(f"{branch.name}: the weights do not carry it, so the model is built without it")
    return state


def _linear_and_bn(model: nn.Module) -> tuple[set[str], list[str]]:
    linear = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    bns = [name for name, m in model.named_modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    return linear, bns


def _shape(value) -> tuple[int, ...]:
    return tuple(value.shape)


def _mismatch_message(family: str, ctx: ConversionContext, missing: list[str], unexpected: list[str],
                      wrong_shape: list[str], model_sd: dict, tensors: dict, hint: str | None) -> str:
    limit = 25
    lines = [f"the weights do not fit family {family!r}"
             + (f" (sub-model prefix {ctx.prefix!r})" if ctx.prefix else "") + ":"]
    if missing:
        lines.append(f"  {len(missing)} missing key(s) (in the PyTorch model, not in the weights):")
        lines += [f"    {k} {list(_shape(model_sd[k]))}" for k in missing[:limit]]
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected key(s) (in the weights, not in the model):")
        for k in unexpected[:limit]:
            near = difflib.get_close_matches(k, missing or list(model_sd), n=1)
            source = ctx.origin.get(k, k)
            lines.append(f"    {source}" + (f" (as {k})" if source != k else "") + f" {list(_shape(tensors[k]))}"
                         + (f"; nearest model key: {near[0]}" if near else ""))
    if wrong_shape:
        lines.append(f"  {len(wrong_shape)} shape mismatch(es):")
        lines += [f"    {ctx.origin.get(k, k)}: weights {list(_shape(tensors[k]))}, model {list(_shape(model_sd[k]))}"
                  for k in wrong_shape[:limit]]
    if hint:
        lines.append(f"  hint: {hint}")
    return "\n".join(lines)


def _prepare(weights, family, submodel, form, kind) -> tuple[ConversionContext, State]:
    """Steps 1-5 for ``family``: the context (config, records) and the state dict under PyTorch names."""
    rules = _family_rules(family)
    config = architectures.family_config(family, form=form)
    ctx = ConversionContext(family=family, kind=kind if kind is not None else getattr(weights, "kind", None),
                            form=form, config=config)
    state = map_keys(weights, rules, ctx, submodel)
    return ctx, state


def _as_tensor(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """``array`` as a tensor of ``dtype``, sharing its memory (strides included) when it is writable and of that
    dtype; a read-only array is copied."""
    if not array.flags.writeable:
        array = np.array(array, order="C")
    return torch.from_numpy(array).to(dtype)


def _fit(model: nn.Module, state: State, ctx: ConversionContext):
    """Steps 6-7 without loading: tensors named and shaped for ``model``, plus the mismatch lists."""
    model_sd = model.state_dict()
    linear, bns = _linear_and_bn(model)
    tensors: dict[str, torch.Tensor] = {}
    transposed: list[str] = []
    for key, array in state.items():
        module_name, _, leaf = key.rpartition(".")
        if module_name in linear and leaf == "weight" and array.ndim == 2:
            array = array.T  # a view: the model's Linear weight is Paddle's [in, out] array, read transposed
            transposed.append(key)
        target = model_sd.get(key)
        tensors[key] = _as_tensor(array, target.dtype if target is not None else torch.float32)
    added: list[tuple[str, str]] = []
    for name in bns:
        key = f"{name}.num_batches_tracked"
        if key not in tensors:
            tensors[key] = torch.zeros((), dtype=torch.long)
            added.append((key, "bn_num_batches_tracked"))
    missing = [k for k in model_sd if k not in tensors]
    unexpected = [k for k in tensors if k not in model_sd]
    wrong_shape = [k for k in tensors if k in model_sd and _shape(tensors[k]) != _shape(model_sd[k])]
    return model_sd, tensors, transposed, added, missing, unexpected, wrong_shape


def convert(weights: Mapping[str, np.ndarray], family: str, *, submodel: str | None = None, form: str = "deploy",
            kind: str | None = None) -> Conversion:
    """Map Paddle weights (structured names -> arrays) onto the PyTorch model of ``family``.

    ``submodel`` selects a distillation sub-model (default: the family's preferred one, e.g. Student);
    ``form`` is passed to the architecture config; ``kind`` ("trained" / "inference") defaults to
    ``weights.kind`` when present. Raises FamilyError / KeyMismatchError; never returns a partial model.
    The model's tensors share memory with the writable arrays of ``weights`` (no copy of the checkpoint); the
    ``nn.Linear`` weights are transposed views (not contiguous).
    """
    ctx, state = _prepare(weights, family, submodel, form, kind)
    with torch.device("meta"):  # shapes only: Conversion.model gets the checkpoint's tensors on first use
        model = architectures.build(ctx.config, init_weights=False)
    model_sd, tensors, transposed, added, missing, unexpected, wrong_shape = _fit(model, state, ctx)
    if missing or unexpected or wrong_shape:
        guess = detect_family(weights)
        hint = f"these weights look like family {guess!r}" if guess and guess != family else None
        raise KeyMismatchError(_mismatch_message(family, ctx, missing, unexpected, wrong_shape, model_sd, tensors,
                                                 hint))
    if transposed:
        ctx.notes.append(f"linear_transpose: {len(transposed)} nn.Linear weight(s) transposed from [in, out]")
    logger.debug("%s: %d tensors loaded, %d keys dropped, %d renamed, %d transposed", family, len(tensors),
                 len(ctx.dropped), len(ctx.renamed), len(transposed))
    return Conversion(state_dict={key: tensors[key] for key in model_sd}, config=ctx.config, dropped=ctx.dropped,
                      renamed=ctx.renamed, notes=ctx.notes, transposed=transposed, added=added,
                      submodel=ctx.prefix, _model=model)


_SIGNATURES: dict[str, dict[str, tuple[int, ...]]] = {}


def _signature(config: dict) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the model a config builds (on the meta device: no memory, no init cost)."""
    cache_key = repr(config)
    if cache_key not in _SIGNATURES:
        with torch.device("meta"):
            model = architectures.build(copy.deepcopy(config))
        _SIGNATURES[cache_key] = {k: _shape(v) for k, v in model.state_dict().items()}
    return _SIGNATURES[cache_key]


def detect_family(weights: Mapping[str, np.ndarray]) -> str | None:
    """The first family (in ``RULES`` order) whose rules map ``weights`` exactly onto its model (key names and
    shapes), or None. Families that share one architecture (ppocr_mobile_v2.0_det and PP-OCRv2_det) cannot be
    told apart by their weights; the first one is returned."""
    for family, rules in RULES.items():
        try:
            ctx, state = _prepare(weights, family, None, "deploy", None)
            signature = _signature(ctx.config)
        except Exception:  # noqa: BLE001 - a family whose rules reject the weights is simply not a match
            continue
        ok = True
        for key, array in state.items():
            expected = signature.get(key)
            shape = tuple(array.shape)
            if expected is None or (shape != expected and not (len(shape) == 2 and shape[::-1] == expected)):
                ok = False  # 2-D weights may be Linear ones still in Paddle's [in, out] layout
                break
        needed = {k for k in signature if not k.endswith("num_batches_tracked")}
        if ok and needed <= set(state):
            return family
    return None


RULES: dict[str, FamilyRules] = _collect_rules()
