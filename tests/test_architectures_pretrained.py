"""``architectures.load_pretrained`` on directories written here the way ``ocrconv convert`` writes them (config.json,
model.safetensors, dict.txt), from small randomly initialised models: validation, dtypes, config overrides, and
``architectures`` working without the converter package."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import architectures
from architectures import load_pretrained
from architectures.errors import (ConfigError, DictionaryMismatchError, DtypeRangeError, ModelDirectoryError,
                                  WeightsMismatchError)
from model_helpers import randomize_batch_norms

CLS = "ppocr_mobile_v2.0_cls"
REC = "PP-OCRv4_mobile_rec"
REC_CLASSES = 6  # 5 characters + the CTC blank
CHARACTERS = ["a", "b", "c", "d", " "]


def write_model_dir(directory: Path, config: dict, state_dict: dict[str, torch.Tensor],
                    characters: list[str] | None = None) -> Path:
    """A model directory as ``ocrconv convert`` writes it (safetensors stores the tensors sorted by dtype size)."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config), encoding="utf-8")
    if characters is not None:
        (directory / "dict.txt").write_text("".join(f"{c}\n" for c in characters), encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def cls_model() -> tuple[dict, nn.Module]:
    torch.manual_seed(0)
    config = architectures.family_config(CLS)
    return config, randomize_batch_norms(architectures.build(config))


@pytest.fixture(scope="module")
def rec_dir(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    config = architectures.family_config(REC, head={"out_channels": REC_CLASSES})
    model = randomize_batch_norms(architectures.build(config))
    return write_model_dir(tmp_path_factory.mktemp("rec"), config, model.state_dict(), CHARACTERS)


def copy_with(source: Path, target: Path, config_edit=None, dict_lines: list[str] | None = None) -> Path:
    shutil.copytree(source, target)
    if config_edit is not None:
        config = json.loads((target / "config.json").read_text())
        config_edit(config)
        (target / "config.json").write_text(json.dumps(config))
    if dict_lines is not None:
        (target / "dict.txt").write_text("".join(f"{line}\n" for line in dict_lines))
    return target


def test_key_mismatches_are_listed_with_shapes(tmp_path, cls_model):
    config, model = cls_model
    state = dict(model.state_dict())
    conv = state.pop("backbone.conv1.conv.weight")
    state["backbone.conv1.conv.weight_renamed"] = conv
    state["head.fc.weight"] = torch.zeros(3, 7)
    directory = write_model_dir(tmp_path / "bad", config, state)
    with pytest.raises(WeightsMismatchError) as info:
        load_pretrained(directory)
    message = str(info.value)
    shape = list(conv.shape)
    assert f"1 missing key(s) (in the model, not in the file):\n    backbone.conv1.conv.weight {shape}" in message
    assert f"1 unexpected key(s) (in the file, not in the model):\n    backbone.conv1.conv.weight_renamed {shape}" \
        in message
    assert f"head.fc.weight: file [3, 7], model {list(model.head.fc.weight.shape)}" in message
    assert CLS in message


def test_format_version_is_checked(tmp_path, rec_dir):
    assert load_pretrained(rec_dir).characters == CHARACTERS  # no format_version: version 1
    current = copy_with(rec_dir, tmp_path / "v1", lambda c: c.update(format_version=1))
    assert load_pretrained(current).ocrconv_config["format_version"] == 1
    newer = copy_with(rec_dir, tmp_path / "v2", lambda c: c.update(format_version=2))
    with pytest.raises(ConfigError, match="format_version 2, newer than this copy of `architectures` reads "
                                          r"\(up to 1\).*update ocrconv"):
        load_pretrained(newer)
    broken = copy_with(rec_dir, tmp_path / "vx", lambda c: c.update(format_version="1"))
    with pytest.raises(ConfigError, match="format_version must be a positive integer, got '1'"):
        load_pretrained(broken)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.pop("backbone"), r"needs a 'backbone' section.*missing"),
    (lambda c: c.pop("head"), r"needs a 'head' section.*missing"),
    (lambda c: c["backbone"].pop("name"), r"needs a 'backbone' section"),
    (lambda c: c["backbone"].update(name="NoSuchNet"), r"unknown backbone 'NoSuchNet'; known: \["),
    (lambda c: c["backbone"].update(new_argument=1),
     r"backbone 'PPLCNetV3' does not fit the module: .*'new_argument' \(it takes: scale, "),
])
def test_configs_that_cannot_be_built_are_config_errors(tmp_path, rec_dir, edit, message):
    with pytest.raises(ConfigError, match=message):
        load_pretrained(copy_with(rec_dir, tmp_path / "edited", edit))


@pytest.mark.parametrize("lines", [CHARACTERS[:3], CHARACTERS + ["x", "y"]])
def test_a_dictionary_that_does_not_fit_the_head_is_refused(tmp_path, rec_dir, lines):
    with pytest.raises(DictionaryMismatchError, match=f"has {len(lines)} characters, but the model has "
                                                      f"{REC_CLASSES} classes \\(5 characters \\+ the CTC blank\\)"):
        load_pretrained(copy_with(rec_dir, tmp_path / "dict", dict_lines=lines))


def test_a_name_instead_of_a_directory_says_what_load_pretrained_wants(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelDirectoryError, match=r"no directory 'ch_PP-OCRv4_rec': load_pretrained takes the "
                                                  r"directory `ocrconv convert` writes.*from_pretrained"):
        load_pretrained("ch_PP-OCRv4_rec")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelDirectoryError, match="empty has no config.json"):
        load_pretrained("empty")


def test_stored_dtype_is_that_of_the_first_floating_point_tensor(tmp_path, cls_model):
    config, model = cls_model
    half = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    directory = write_model_dir(tmp_path / "half", config, half)  # safetensors puts the int64 counters first
    loaded = load_pretrained(directory, dtype=None)
    assert loaded.backbone.conv1.conv.weight.dtype == torch.float16
    assert loaded.backbone.conv1.bn.running_var.dtype == torch.float32  # batch norms stay float32
    with torch.inference_mode():
        out = loaded(torch.rand(1, 3, 48, 64).half())
    assert out.dtype == torch.float16 and bool(torch.isfinite(out).all())


def test_float16_keeps_batch_norm_statistics_beyond_its_range(tmp_path, cls_model):
    """A running variance above 65504 (PP-OCRv4 det has 9.8e7, for a convolution output of that scale) would
    become inf in float16 and zero its channel."""
    config, model = cls_model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["backbone.conv1.conv.weight"][0] *= 1000
    state["backbone.conv1.bn.running_var"][0] = 1e6
    directory = write_model_dir(tmp_path / "large", config, state)
    reference = load_pretrained(directory)
    half = load_pretrained(directory, dtype=torch.float16)
    x = torch.rand(2, 3, 48, 64) * 2 - 1
    with torch.inference_mode():
        expected = reference.backbone.conv1(x)
        fast = half.backbone.conv1(x.half())
        assert bool(torch.isfinite(half(x.half())).all())
    plain = half.backbone.conv1(x.half()).detach()  # gradients on: a float32 batch norm on a float16 input
    assert float(expected[:, 0].abs().max()) > 0.5  # the channel carries signal
    for out in (fast, plain):
        assert out.dtype == torch.float16
        torch.testing.assert_close(out.float(), expected, rtol=0, atol=2e-2)


def test_weights_beyond_the_dtype_range_or_non_finite_are_refused(tmp_path, cls_model):
    config, model = cls_model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["head.fc.bias"][1] = 1e5
    directory = write_model_dir(tmp_path / "large", config, state)
    with pytest.raises(DtypeRangeError, match=r"head\.fc\.bias \(largest \|value\| 1e\+05 > torch.float16 max 65504\)"):
        load_pretrained(directory, dtype=torch.float16)
    state["head.fc.bias"][1] = float("inf")
    directory = write_model_dir(tmp_path / "inf", config, state)
    with pytest.raises(DtypeRangeError, match=r"non-finite values \(inf or NaN\) in 1 tensor\(s\): head\.fc\.bias"):
        load_pretrained(directory)


def test_use_guide_can_be_turned_off_to_fine_tune_the_backbone_with_ctc(rec_dir):
    x = torch.rand(2, 3, 48, 64)
    unguided = {"head": {"ctc_neck": {"use_guide": False}}}
    for overrides, backbone_trains in ((None, False), (unguided, True)):
        model = load_pretrained(rec_dir, config_overrides=overrides).train()
        model(x).logsumexp(-1).mean().backward()
        assert (model.backbone.conv1.conv.weight.grad is not None) is backbone_trains
        assert model.head.ctc_head.fc.weight.grad is not None
    free = load_pretrained(rec_dir, config_overrides=unguided)
    assert free.ocrconv_config["head"]["ctc_neck"]["use_guide"] is False
    with torch.inference_mode():
        torch.testing.assert_close(load_pretrained(rec_dir)(x), free(x), rtol=0, atol=0)  # same outputs


def test_architectures_works_without_the_converter_package(tmp_path, rec_dir):
    """README: other projects need only torch + safetensors. Run a copy of architectures/ with ``converter``
    made unimportable."""
    shutil.copytree(Path(architectures.__file__).parent, tmp_path / "vendored" / "architectures",
                    ignore=shutil.ignore_patterns("__pycache__"))
    script = f"""
import sys
sys.path.insert(0, {str(tmp_path / "vendored")!r})
sys.modules["converter"] = None  # any import of converter or converter.* fails
import architectures
from architectures.errors import ModelDirectoryError, UnknownFamilyError
assert architectures.__file__.startswith({str(tmp_path / "vendored")!r}), architectures.__file__
try:
    architectures.family_config("PP-OCRv9_rec")
except UnknownFamilyError as exc:
    print("family:", exc)
try:
    architectures.from_pretrained("ch_PP-OCRv4_rec")
except ModelDirectoryError as exc:
    print("from_pretrained:", exc)
print("characters:", len(architectures.load_pretrained({str(rec_dir)!r}).characters))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "family: unknown architecture family 'PP-OCRv9_rec'" in result.stdout
    assert "from_pretrained: 'ch_PP-OCRv4_rec' is not a directory written by `ocrconv convert`" in result.stdout
    assert f"characters: {len(CHARACTERS)}" in result.stdout
