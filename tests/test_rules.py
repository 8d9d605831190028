"""The key-mapping engine (converter.rules) on synthetic Paddle-style state dicts of the classic families.

A PyTorch model with random weights is exported to Paddle's naming and layout (``_mean``/``_variance``,
Linear [in, out], LSTM tensors under both spellings, sub-model prefixes), converted back, and compared.
"""
from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import architectures
from converter import rules
from converter.errors import FamilyError, KeyMismatchError, OcrconvError
from converter.rules import FamilyRules, convert, detect_family

CLASSIC = ["ppocr_mobile_v2.0_det", "ppocr_server_v2.0_det", "PP-OCRv2_det", "PP-OCRv3_det",
           "ppocr_mobile_v2.0_rec", "ppocr_server_v2.0_rec", "PP-OCRv2_rec", "PP-OCRv3_rec", "ppocr_mobile_v2.0_cls"]
_LSTM_KEY = re.compile(r"^(?P<base>.*\.lstm)\.(?P<param>weight_ih|weight_hh|bias_ih|bias_hh)_l(?P<layer>\d+)"
                       r"(?P<rev>_reverse)?$")


def paddle_state(model: nn.Module, *, lstm: str = "both", prefix: str = "", seed: int = 0) -> dict[str, np.ndarray]:
    """``model``'s state in Paddle's naming/layout, with fresh random values.

    ``lstm``: "both" (trained checkpoints: torch-style and cell_fw/cell_bw spellings) or "cells" (inference .info).
    """
    rng = np.random.RandomState(seed)
    linear = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    out: dict[str, np.ndarray] = {}
    for key, tensor in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        value = rng.standard_normal(tuple(tensor.shape)).astype(np.float32)
        if key.endswith("running_var"):
            value = np.abs(value) + 0.5
        module, _, leaf = key.rpartition(".")
        if module in linear and leaf == "weight":
            value = np.ascontiguousarray(value.T)
        name = key.replace(".running_mean", "._mean").replace(".running_var", "._variance")
        match = _LSTM_KEY.match(name)
        if match:
            cell = f"{match['base']}.{match['layer']}.cell_{'bw' if match['rev'] else 'fw'}.{match['param']}"
            out[prefix + cell] = value
            if lstm == "cells":
                continue
        out[prefix + name] = value
    return out


def expected_torch(model: nn.Module, weights: dict[str, np.ndarray], prefix: str = "") -> dict[str, torch.Tensor]:
    linear = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    expected = {}
    for key in model.state_dict():
        if key.endswith("num_batches_tracked"):
            continue
        name = key.replace(".running_mean", "._mean").replace(".running_var", "._variance")
        match = _LSTM_KEY.match(name)
        if match:
            name = f"{match['base']}.{match['layer']}.cell_{'bw' if match['rev'] else 'fw'}.{match['param']}"
        value = weights[prefix + name]
        module, _, leaf = key.rpartition(".")
        expected[key] = torch.from_numpy(value.T.copy() if module in linear and leaf == "weight" else value)
    return expected


@pytest.fixture(scope="module")
def templates() -> dict[str, nn.Module]:
    return {f: architectures.build(architectures.family_config(f)) for f in CLASSIC}


def assert_loaded(conversion, expected: dict[str, torch.Tensor]) -> None:
    state = conversion.state_dict
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    batches = [k for k in state if k.endswith("num_batches_tracked")]
    assert sorted(batches) == sorted(k for k, _rule in conversion.added)
    assert all(rule == "bn_num_batches_tracked" for _k, rule in conversion.added)


def test_rules_exist_for_every_classic_family():
    assert set(CLASSIC) <= set(rules.RULES)
    assert all(isinstance(r, FamilyRules) and r.family == f for f, r in rules.RULES.items())


@pytest.mark.parametrize("family", CLASSIC)
@pytest.mark.parametrize("lstm", ["both", "cells"])
def test_round_trip_every_family(templates, family, lstm):
    weights = paddle_state(templates[family], lstm=lstm)
    conversion = convert(weights, family)
    assert_loaded(conversion, expected_torch(templates[family], weights))
    assert not conversion.model.training
    # every input key is accounted for: mapped onto the model or dropped by a named rule
    assert len(weights) == len(conversion.state_dict) - len(conversion.added) + len(conversion.dropped)
    if lstm == "both" and "lstm" in " ".join(weights):
        assert {r for *_, r in conversion.dropped} == {"lstm_duplicate_alias"}
    if lstm == "cells" and "lstm" in " ".join(weights):
        assert {r for *_, r in conversion.renamed} >= {"lstm_cell_alias", "bn_running_stats"}


def test_linear_weights_are_transposed_by_module_type_even_when_square(templates):
    weights = paddle_state(templates["PP-OCRv3_rec"])
    conversion = convert(weights, "PP-OCRv3_rec")
    proj = "head.ctc_encoder.encoder.svtr_block.0.mixer.proj.weight"
    assert weights[proj].shape == (120, 120)
    assert torch.equal(conversion.state_dict[proj], torch.from_numpy(weights[proj].T.copy()))
    assert proj in conversion.transposed
    # conv weights are never transposed
    assert not any(k.endswith("conv.weight") for k in conversion.transposed)


def test_model_shares_the_checkpoint_memory_and_copies_only_what_it_must(templates):
    """No second copy of the weights: writable arrays become the model's tensors as they are (a Linear weight as
    a transposed view); a read-only array is copied, without torch's non-writable-array warning."""
    weights = paddle_state(templates["ppocr_mobile_v2.0_cls"])
    frozen = next(k for k in weights if k.endswith("conv.weight"))
    weights[frozen].flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        conversion = convert(weights, "ppocr_mobile_v2.0_cls")
    assert conversion.transposed == ["head.fc.weight"]
    shared = 0
    for key, tensor in conversion.state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        array = weights[key.replace(".running_mean", "._mean").replace(".running_var", "._variance")]
        if key == frozen:
            assert not np.shares_memory(tensor.numpy(), array) and tensor.numpy().flags.writeable
        else:
            assert np.shares_memory(tensor.numpy(), array), key
            shared += 1
    assert shared == len(weights) - 1
    fc = conversion.state_dict["head.fc.weight"]
    assert not fc.is_contiguous() and torch.equal(fc, torch.from_numpy(weights["head.fc.weight"].T.copy()))
    assert_loaded(conversion, expected_torch(templates["ppocr_mobile_v2.0_cls"],
                                             {**weights, frozen: weights[frozen].copy()}))
    # the model is loaded on first use, and holds the state dict's very tensors
    assert not conversion._loaded
    model_tensors = dict(conversion.model.state_dict())
    assert conversion._loaded and conversion.model is conversion.model
    assert all(model_tensors[k].data_ptr() == t.data_ptr() for k, t in conversion.state_dict.items())


@pytest.mark.parametrize("prefix", ["Student.", "student_model."])
def test_distillation_prefixes_are_accepted_and_other_submodels_dropped(templates, prefix):
    student = paddle_state(templates["PP-OCRv2_det"], prefix=prefix, seed=1)
    teacher = paddle_state(templates["ppocr_server_v2.0_det"], prefix="Teacher.", seed=2)
    student2 = paddle_state(templates["PP-OCRv2_det"], prefix="Student2.", seed=3)
    conversion = convert({**teacher, **student, **student2}, "PP-OCRv2_det")
    assert_loaded(conversion, expected_torch(templates["PP-OCRv2_det"], student, prefix))
    dropped = {key for key, _shape, rule in conversion.dropped if rule == "other_submodel"}
    assert dropped == set(teacher) | set(student2)
    assert all(shape == teacher[k].shape for k, shape, _ in conversion.dropped if k in teacher)


def test_student2_and_teacher_can_be_selected(templates):
    student = paddle_state(templates["PP-OCRv3_det"], prefix="Student.", seed=1)
    student2 = paddle_state(templates["PP-OCRv3_det"], prefix="Student2.", seed=3)
    teacher_config = architectures.family_config("PP-OCRv3_det")
    teacher_config.update(rules.RULES["PP-OCRv3_det"].submodel_configs["Teacher."])
    teacher_model = architectures.build(teacher_config)
    teacher = paddle_state(teacher_model, prefix="Teacher.", seed=4)
    weights = {**student, **student2, **teacher}
    assert_loaded(convert(weights, "PP-OCRv3_det"), expected_torch(templates["PP-OCRv3_det"], student, "Student."))
    conversion = convert(weights, "PP-OCRv3_det", submodel="Student2")
    assert_loaded(conversion, expected_torch(templates["PP-OCRv3_det"], student2, "Student2."))
    conversion = convert(weights, "PP-OCRv3_det", submodel="Teacher")
    assert_loaded(conversion, expected_torch(teacher_model, teacher, "Teacher."))
    assert conversion.config["backbone"] == {"name": "DetResNet_vd", "layers": 50}
    assert conversion.model.head.binarize.conv1.kernel_size == (7, 7)
    assert {k.split(".")[0] for k, *_ in conversion.dropped} == {"Student", "Student2"}
    with pytest.raises(FamilyError, match="sub-model 'Student3' cannot be converted"):
        convert(weights, "PP-OCRv3_det", submodel="Student3")
    with pytest.raises(FamilyError, match="no sub-model 'Student2'"):
        convert(student, "PP-OCRv3_det", submodel="Student2")


def test_recognition_teacher_shares_the_student_architecture(templates):
    student = paddle_state(templates["PP-OCRv2_rec"], prefix="Student.", seed=1)
    teacher = paddle_state(templates["PP-OCRv2_rec"], prefix="Teacher.", seed=2)
    conversion = convert({**student, **teacher}, "PP-OCRv2_rec", submodel="Teacher")
    assert_loaded(conversion, expected_torch(templates["PP-OCRv2_rec"], teacher, "Teacher."))


def test_sar_head_is_dropped_by_name(templates):
    weights = paddle_state(templates["PP-OCRv3_rec"], prefix="Student.")
    sar = {"Student.head.sar_head.decoder.embedding.weight": np.zeros((6627, 512), np.float32),
           "Student.head.sar_head.decoder.prediction.weight": np.zeros((1536, 6626), np.float32)}
    conversion = convert({**weights, **sar}, "PP-OCRv3_rec")
    assert {(k, r) for k, _s, r in conversion.dropped} == {(k, "sar_head_training_only") for k in sar}
    assert conversion.config["head"]["out_channels"] == 6625  # from the CTC head, not from the SAR head


def test_db_threshold_branch_is_optional(templates):
    weights = paddle_state(templates["ppocr_mobile_v2.0_det"])
    without = {k: v for k, v in weights.items() if not k.startswith("head.thresh.")}
    conversion = convert(without, "ppocr_mobile_v2.0_det")
    assert conversion.config["head"]["use_threshold"] is False
    assert any("db_threshold_branch" in note for note in conversion.notes)
    full = convert(weights, "ppocr_mobile_v2.0_det")
    assert full.config["head"].get("use_threshold", True) is True
    shared = set(conversion.state_dict)
    assert shared < set(full.state_dict)
    assert all(torch.equal(conversion.state_dict[k], full.state_dict[k]) for k in shared)


@pytest.mark.parametrize("classes", [97, 137, 8423])
def test_class_count_comes_from_the_checkpoint(templates, classes):
    for family in ("ppocr_mobile_v2.0_rec", "PP-OCRv2_rec", "PP-OCRv3_rec"):
        model = architectures.build(architectures.family_config(family, head={"out_channels": classes}))
        conversion = convert(paddle_state(model), family)
        assert conversion.config["head"]["out_channels"] == classes
        assert conversion.model(torch.rand(1, 3, 48 if "v3" in family else 32, 64)).shape[-1] == classes


def test_lstm_spellings_must_agree(templates):
    weights = paddle_state(templates["ppocr_mobile_v2.0_rec"])
    weights["neck.encoder.lstm.1.cell_bw.bias_hh"] = weights["neck.encoder.lstm.1.cell_bw.bias_hh"] + 1e-3
    with pytest.raises(FamilyError, match=r"neck\.encoder\.lstm\.1\.cell_bw\.bias_hh.*bias_hh_l1_reverse"):
        convert(weights, "ppocr_mobile_v2.0_rec")


def test_missing_key_is_reported_with_shape_and_family(templates):
    weights = paddle_state(templates["ppocr_mobile_v2.0_cls"])
    del weights["backbone.blocks.3.mid_se.conv1.weight"]
    with pytest.raises(KeyMismatchError) as info:
        convert(weights, "ppocr_mobile_v2.0_cls")
    message = str(info.value)
    assert "ppocr_mobile_v2.0_cls" in message and "1 missing key" in message
    assert "backbone.blocks.3.mid_se.conv1.weight [8, 32, 1, 1]" in message


def test_unconsumed_key_is_an_error_with_nearest_name(templates):
    weights = paddle_state(templates["ppocr_mobile_v2.0_cls"])
    weights["backbone.blocks.3.mid_se.conv3.weight"] = np.zeros((8, 32, 1, 1), np.float32)
    with pytest.raises(KeyMismatchError, match=r"unexpected key.*\n.*conv3\.weight \[8, 32, 1, 1\]; nearest"):
        convert(weights, "ppocr_mobile_v2.0_cls")


def test_shape_mismatch_is_reported(templates):
    weights = paddle_state(templates["ppocr_mobile_v2.0_det"])
    weights["neck.in5_conv.weight"] = np.zeros((96, 481, 1, 1), np.float32)
    with pytest.raises(KeyMismatchError, match=r"neck\.in5_conv\.weight: weights \[96, 481, 1, 1\], model \[96, 480"):
        convert(weights, "ppocr_mobile_v2.0_det")


def test_checkpoint_of_another_family_names_the_likely_family(templates):
    weights = paddle_state(templates["PP-OCRv3_det"])
    with pytest.raises(KeyMismatchError, match="look like family 'PP-OCRv3_det'") as info:
        convert(weights, "ppocr_mobile_v2.0_det")
    assert "neck.ins_conv.0.in_conv.weight" in str(info.value)


def test_unknown_family_is_refused():
    with pytest.raises(FamilyError, match="no conversion rules for family 'PP-OCRv5_det'"):
        convert({}, "PP-OCRv5_det")


def test_unexpected_prefix_is_refused(templates):
    weights = paddle_state(templates["ppocr_mobile_v2.0_cls"], prefix="Student.")
    with pytest.raises(OcrconvError, match="unexpected key"):
        convert(weights, "ppocr_mobile_v2.0_cls")


@pytest.mark.parametrize("family", CLASSIC)
def test_detect_family(templates, family):
    weights = paddle_state(templates[family], lstm="cells")
    guess = detect_family(weights)
    # PP-OCRv2_det and ppocr_mobile_v2.0_det share one architecture: either answer is right
    same = {"PP-OCRv2_det", "ppocr_mobile_v2.0_det"}
    assert guess == family or {guess, family} <= same
    assert detect_family({"foo.bar": np.zeros(3, np.float32)}) is None


# Class counts of every multilingual v2.0 recognition row (REFERENCE.md section 1: the N column, the entry the
# release models use). The head size is all a converter sees, so each must round-trip unchanged.
MULTILINGUAL_CLASSES = {
    "french_mobile_v2.0_rec": 138, "german_mobile_v2.0_rec": 145, "korean_mobile_v2.0_rec": 3690,
    "japan_mobile_v2.0_rec": 4401, "it_mobile_v2.0_rec": 120, "es_mobile_v2.0_rec": 112, "pt_mobile_v2.0_rec": 132,
    "ru_mobile_v2.0_rec": 128, "ar_mobile_v2.0_rec": 120, "hi_mobile_v2.0_rec": 164,
    "chinese_cht_mobile_v2.0_rec": 8423, "ug_mobile_v2.0_rec": 116, "fa_mobile_v2.0_rec": 139,
    "ur_mobile_v2.0_rec": 139, "rs_latin_mobile_v2.0_rec": 93, "oc_mobile_v2.0_rec": 99, "mr_mobile_v2.0_rec": 155,
    "ne_mobile_v2.0_rec": 155, "rs_cyrillic_mobile_v2.0_rec": 137, "bg_mobile_v2.0_rec": 142,
    "uk_mobile_v2.0_rec": 145, "be_mobile_v2.0_rec": 148, "te_mobile_v2.0_rec": 153, "ka_mobile_v2.0_rec": 156,
    "ta_mobile_v2.0_rec": 131, "latin_ppocr_mobile_v2.0_rec": 187, "arabic_ppocr_mobile_v2.0_rec": 164,
    "cyrillic_ppocr_mobile_v2.0_rec": 165, "devanagari_ppocr_mobile_v2.0_rec": 169, "en_number_mobile_v2.0_rec": 97,
}


@pytest.mark.parametrize("row", sorted(MULTILINGUAL_CLASSES))
def test_multilingual_rows_round_trip(row):
    classes = MULTILINGUAL_CLASSES[row]
    model = architectures.build(architectures.family_config("ppocr_mobile_v2.0_rec", head={"out_channels": classes}))
    for lstm in ("both", "cells"):
        weights = paddle_state(model, lstm=lstm, seed=classes)
        conversion = convert(weights, "ppocr_mobile_v2.0_rec")
        assert conversion.config["head"]["out_channels"] == classes
        assert_loaded(conversion, expected_torch(model, weights))
