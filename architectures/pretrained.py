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

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
DICT_FILE = "dict.txt"
METADATA_KEY = "ocrconv"


def read_config(directory: str | os.PathLike) -> dict:
    """The ``config.json`` of a converted model directory."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {directory} is not a directory written by `ocrconv convert`")
    return json.loads(path.read_text(encoding="utf-8"))


def architecture_config(config: dict) -> dict:
    """The part of config.json that ``architectures.build`` takes (without ocrconv's provenance section)."""
    return {k: v for k, v in config.items() if k != METADATA_KEY}


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
                    dtype: torch.dtype | None = torch.float32) -> torch.nn.Module:
    """Build the architecture from ``config.json``, load ``model.safetensors`` strictly, return it in eval mode.

    ``dtype=None`` keeps the stored dtype (float16 outputs stay float16). The returned module carries
    ``ocrconv_config`` (config.json) and ``characters`` (rec models: the class list; otherwise None).
    """
    from safetensors.torch import load_file

    import architectures

    directory = Path(directory)
    config = read_config(directory)
    model = architectures.build(architecture_config(config))
    state_dict = load_file(str(directory / WEIGHTS_FILE), device=str(device))
    if dtype is not None:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
        model.to(dtype)
    elif state_dict:
        model.to(next(iter(state_dict.values())).dtype)
    model.load_state_dict(state_dict, strict=True)
    model.to(device)
    model.eval()
    model.ocrconv_config = config
    model.characters = read_characters(directory)
    return model


def from_pretrained(name_or_dir: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
                    **load_kwargs) -> torch.nn.Module:
    """``load_pretrained`` for a converted directory, or convert a manifest name once (cached) and load it.

    Converting needs the ``converter`` package (ocrconv); loading a directory does not.
    """
    path = Path(name_or_dir)
    if (path / CONFIG_FILE).is_file():
        return load_pretrained(path, **load_kwargs)
    from converter.convert import converted_dir

    return load_pretrained(converted_dir(str(name_or_dir), cache_dir=cache_dir), **load_kwargs)
