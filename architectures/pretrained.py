"""Load a model converted by ``ocrconv convert``: ``config.json`` + ``model.safetensors`` (+ ``dict.txt``).

Needs only torch and safetensors, so other projects can use the converted weights without ocrconv's CLI::

    from architectures import load_pretrained
    model = load_pretrained("ch_PP-OCRv4_rec")          # the output directory
    probs = model(images)                                # (N, T, C) softmax for rec
    text = model.characters                              # class i + 1 -> model.characters[i]
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from architectures.errors import (ConfigError, DictionaryMismatchError, DtypeRangeError, ModelDirectoryError,
                                  WeightsMismatchError)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
DICT_FILE = "dict.txt"
METADATA_KEY = "ocrconv"
# config.json's layout version: this package reads versions up to FORMAT_VERSION; a file without the key is 1.
FORMAT_VERSION_KEY = "format_version"
FORMAT_VERSION = 1
# Dtypes below float32 precision: batch norms stay float32 in them (see load_pretrained).
HALF_DTYPES = (torch.float16, torch.bfloat16)
_LISTED = 20  # names listed per kind of problem in an error message


def _not_a_model_directory(directory: Path) -> str:
    return (f"load_pretrained takes the directory `ocrconv convert` writes (config.json, model.safetensors, dict.txt "
            f"for rec), e.g. `ocrconv convert {directory.name} --out models/{directory.name}` and then "
            f"load_pretrained('models/{directory.name}'); architectures.from_pretrained(name) converts a manifest "
            f"name once and loads it (needs ocrconv installed)")


def read_config(directory: str | os.PathLike) -> dict:
    """The ``config.json`` of a converted model directory, checked: a JSON object whose ``format_version`` this
    package can read (ModelDirectoryError / ConfigError otherwise)."""
    directory = Path(directory)
    if not directory.exists():
        raise ModelDirectoryError(f"no directory {str(directory)!r}: {_not_a_model_directory(directory)}")
    if not directory.is_dir():
        raise ModelDirectoryError(f"{directory} is a file, not a directory: {_not_a_model_directory(directory)}")
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise ModelDirectoryError(f"{directory} has no {CONFIG_FILE}, so it is not a directory written by `ocrconv "
                                  f"convert`: {_not_a_model_directory(directory)}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} must hold a JSON object, found {type(config).__name__}")
    version = config.get(FORMAT_VERSION_KEY, 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ConfigError(f"{path}: {FORMAT_VERSION_KEY} must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ConfigError(f"{path} has {FORMAT_VERSION_KEY} {version}, newer than this copy of `architectures` "
                          f"reads (up to {FORMAT_VERSION}): it was written by a newer ocrconv; update ocrconv (or "
                          f"the architectures/ package you copied) to load it")
    return config


def architecture_config(config: dict) -> dict:
    """The part of config.json that ``architectures.build`` takes (without ocrconv's provenance section and the
    format version)."""
    return {k: v for k, v in config.items() if k not in (METADATA_KEY, FORMAT_VERSION_KEY)}


def read_characters(directory: str | os.PathLike) -> list[str] | None:
    """The resolved character list (``dict.txt``, one class per line, class ``i + 1`` on line ``i``), or None."""
    path = Path(directory) / DICT_FILE
    if not path.is_file():
        return None
    data = path.read_bytes().split(b"\n")
    if data and data[-1] == b"":
        data.pop()
    return [line.decode("utf-8") for line in data]


def load_pretrained(directory: str | os.PathLike, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = torch.float32, config_overrides: dict | None = None) -> nn.Module:
    """Build the architecture from ``config.json``, load ``model.safetensors`` strictly, return it in eval mode.

    The returned module carries ``ocrconv_config`` (config.json, with ``config_overrides`` merged in) and
    ``characters`` (rec models: the class list of dict.txt; otherwise None).

    * ``dtype=None`` keeps the stored dtype (that of the file's first floating-point tensor). In float16 and
      bfloat16 the batch norms stay float32 (their statistics exceed float16's range in real models, e.g.
      PP-OCRv4 det's running variances up to 1e8); the inference fast path folds them into the convolutions in
      float64 and rounds the result once to the model's dtype (``model.half()`` would cast them too: pass
      ``dtype`` here instead). Other weights beyond the dtype's range, and non-finite values in the file, raise
      DtypeRangeError naming the tensors.
    * ``config_overrides`` is merged into config.json before building (dicts recursively), e.g.
      ``{"head": {"ctc_neck": {"use_guide": False}}}``: PP-OCRv3 / PP-OCRv4 rec detach the backbone features
      before the CTC neck (``use_guide``, as PaddleOCR, whose SAR / NRTR branch trains the backbone; that branch is
      not built here), so fine-tuning with a CTC loss alone never updates the backbone unless it is turned off.
      Outputs do not depend on it.
    * Det models take inputs whose height and width are multiples of 32 (ValueError otherwise).
    * Inference fast path: in eval mode without gradients, batch norms are folded into the convolutions and the
      folded (and oneDNN-packed) weights are cached. Changes made through ``.data`` (``p.data.mul_(0.5)``, EMA
      updates written that way) are invisible to torch's version counters: call ``model.clear_inference_cache()``
      after them. In-place edits under ``torch.no_grad()``, optimizer steps, ``load_state_dict``, ``.to()`` and
      train()/eval() transitions are noticed. ``torch.jit.trace``, ``torch.compile`` and ``torch.export`` get the
      plain module computations. Forward hooks are honoured: a module with forward (pre-)hooks on it or inside it,
      or any global module hook, runs its plain path, so every hook fires and the tensors it sees are not modified
      afterwards (that module is then slower).

    Errors: ModelDirectoryError (not a directory written by ``ocrconv convert``, missing file), ConfigError
    (config.json that cannot be built, or a newer ``format_version``), WeightsMismatchError (missing / unexpected /
    wrongly shaped tensors, listed with shapes), DictionaryMismatchError (dict.txt does not fit the head's class
    count), DtypeRangeError; all from ``architectures.errors``.
    """
    from safetensors.torch import load_file

    import architectures

    directory = Path(directory)
    config = read_config(directory)
    if config_overrides:
        config = architectures._merge(config, config_overrides)
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise ModelDirectoryError(f"{weights_path} not found: {directory} is incomplete; convert the model again")
    model = architectures.build(architecture_config(config))
    characters = read_characters(directory)
    _check_characters(model, config, characters, directory / DICT_FILE)
    tensors = load_file(str(weights_path), device="cpu")
    target = dtype if dtype is not None else next((t.dtype for t in tensors.values() if t.is_floating_point()), None)
    if target is not None:
        model.to(target)
        if target in HALF_DTYPES:
            for module in model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.float()
    expected = model.state_dict()
    _check_keys(expected, tensors, weights_path, config)
    model.load_state_dict(_cast_checked(tensors, expected, weights_path), strict=True)
    model.to(device)
    model.eval()
    model.ocrconv_config = config
    model.characters = characters
    return model


def _listed(lines: list[str], title: str, items: list[str]) -> None:
    if items:
        lines.append(f"  {len(items)} {title}:")
        lines += [f"    {item}" for item in items[:_LISTED]]
        if len(items) > _LISTED:
            lines.append(f"    ... and {len(items) - _LISTED} more")


def _check_keys(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], weights_path: Path,
                config: dict) -> None:
    """WeightsMismatchError listing missing, unexpected and wrongly shaped tensors with their shapes."""
    missing = [f"{k} {list(v.shape)}" for k, v in expected.items() if k not in tensors]
    unexpected = [f"{k} {list(v.shape)}" for k, v in tensors.items() if k not in expected]
    wrong_shape = [f"{k}: file {list(tensors[k].shape)}, model {list(v.shape)}" for k, v in expected.items()
                   if k in tensors and tensors[k].shape != v.shape]
    if missing or unexpected or wrong_shape:
        lines = [f"{weights_path} does not fit the architecture its config.json describes "
                 f"(family {config.get('family', 'not named')}):"]
        _listed(lines, "missing key(s) (in the model, not in the file)", missing)
        _listed(lines, "unexpected key(s) (in the file, not in the model)", unexpected)
        _listed(lines, "shape mismatch(es)", wrong_shape)
        raise WeightsMismatchError("\n".join(lines))


def _cast_checked(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                  weights_path: Path) -> dict[str, torch.Tensor]:
    """``tensors`` in the dtypes of the model's ``expected`` state dict; DtypeRangeError for non-finite values in
    the file and for values beyond the range of their new dtype."""
    non_finite, too_large, out = [], [], {}
    for key, tensor in tensors.items():
        target = expected[key].dtype
        if tensor.is_floating_point():
            if not bool(torch.isfinite(tensor).all()):
                non_finite.append(key)
            elif target.is_floating_point and torch.finfo(target).max < torch.finfo(tensor.dtype).max:
                largest = float(tensor.abs().max()) if tensor.numel() else 0.0
                if largest > torch.finfo(target).max:
                    too_large.append(f"{key} (largest |value| {largest:.4g} > {str(target)} max "
                                     f"{torch.finfo(target).max:g})")
        out[key] = tensor.to(target)
    if non_finite:
        raise DtypeRangeError(f"{weights_path} holds non-finite values (inf or NaN) in {len(non_finite)} tensor(s): "
                              f"{', '.join(non_finite[:_LISTED])}. The file is damaged, or was written in float16 with "
                              f"values beyond float16's range: convert the model again (in float32)")
    if too_large:
        raise DtypeRangeError(f"{len(too_large)} tensor(s) of {weights_path} do not fit the requested dtype: "
                              f"{', '.join(too_large[:_LISTED])}; load with dtype=torch.float32 or torch.bfloat16 "
                              f"(float32's range)")
    return out


def _check_characters(model: nn.Module, config: dict, characters: list[str] | None, dict_path: Path) -> None:
    """DictionaryMismatchError when a rec model's dict.txt does not give one character per non-blank class."""
    classes = getattr(model.head, "out_channels", None)
    if characters is None or config.get("task") != "rec" or not isinstance(classes, int):
        return
    if len(characters) + 1 != classes:
        raise DictionaryMismatchError(
            f"{dict_path} has {len(characters)} characters, but the model has {classes} classes ({classes - 1} "
            f"characters + the CTC blank): the dictionary does not belong to these weights")


def from_pretrained(name_or_dir: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
                    **load_kwargs) -> torch.nn.Module:
    """``load_pretrained`` for a converted directory, or convert a manifest name once (cached) and load it.

    Converting needs the ``converter`` package (ocrconv); loading a directory does not.
    """
    path = Path(name_or_dir)
    if (path / CONFIG_FILE).is_file():
        return load_pretrained(path, **load_kwargs)
    try:
        from converter.convert import converted_dir
    except ModuleNotFoundError as exc:
        raise ModelDirectoryError(f"{str(name_or_dir)!r} is not a directory written by `ocrconv convert`, and "
                                  f"converting a manifest name needs ocrconv's converter package ({exc})") from None

    return load_pretrained(converted_dir(str(name_or_dir), cache_dir=cache_dir), **load_kwargs)
