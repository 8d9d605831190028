"""Pre-v4 architectures: build, module names, output shapes and the activations that differ from torch's."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import architectures
from architectures.errors import UnknownFamilyError
from architectures.layers import HardSigmoid, SEModule, make_divisible

CLASSIC = ["ppocr_mobile_v2.0_det", "ppocr_server_v2.0_det", "PP-OCRv2_det", "PP-OCRv3_det",
           "ppocr_mobile_v2.0_rec", "ppocr_server_v2.0_rec", "PP-OCRv2_rec", "PP-OCRv3_rec", "ppocr_mobile_v2.0_cls"]


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {family: architectures.build(architectures.family_config(family)) for family in CLASSIC}


def test_every_family_has_a_config_with_the_shared_schema():
    assert set(CLASSIC) <= set(architectures.FAMILIES)
    for family in CLASSIC:
        config = architectures.family_config(family)
        assert config["family"] == family
        assert config["task"] in ("det", "rec", "cls")
        assert {"backbone", "neck", "head", "form", "preprocess", "postprocess"} <= set(config)


def test_family_config_is_a_deep_copy_and_merges_overrides():
    config = architectures.family_config("PP-OCRv2_rec", head={"out_channels": 97})
    assert config["head"] == {"name": "CTCHead", "out_channels": 97, "mid_channels": 96}
    config["backbone"]["scale"] = 1.0
    assert architectures.FAMILIES["PP-OCRv2_rec"]["backbone"]["scale"] == 0.5


def test_unknown_family_is_an_unknown_family_error():
    with pytest.raises(UnknownFamilyError, match="PP-OCRv9_det.*known families: PP-OCRv2_det"):
        architectures.family_config("PP-OCRv9_det")


@pytest.mark.parametrize("family,shape,expected", [
    ("ppocr_mobile_v2.0_det", (1, 3, 320, 320), (1, 1, 320, 320)),
    ("ppocr_mobile_v2.0_det", (2, 3, 96, 160), (2, 1, 96, 160)),
    ("ppocr_server_v2.0_det", (1, 3, 64, 96), (1, 1, 64, 96)),
    ("PP-OCRv2_det", (3, 3, 32, 64), (3, 1, 32, 64)),
    ("PP-OCRv3_det", (1, 3, 128, 224), (1, 1, 128, 224)),
    ("ppocr_mobile_v2.0_rec", (1, 3, 32, 320), (1, 80, 6625)),
    ("ppocr_mobile_v2.0_rec", (2, 3, 32, 37), (2, 9, 6625)),
    ("ppocr_server_v2.0_rec", (2, 3, 32, 100), (2, 25, 6625)),
    ("PP-OCRv2_rec", (1, 3, 32, 123), (1, 31, 6625)),
    ("PP-OCRv3_rec", (3, 3, 48, 320), (3, 40, 6625)),
    ("PP-OCRv3_rec", (1, 3, 48, 97), (1, 12, 6625)),
    ("ppocr_mobile_v2.0_cls", (2, 3, 48, 192), (2, 2)),
    ("ppocr_mobile_v2.0_cls", (1, 3, 48, 57), (1, 2)),
])
def test_eval_output_shapes_and_ranges(models, family, shape, expected):
    with torch.no_grad():
        y = models[family](torch.rand(shape))
    assert tuple(y.shape) == expected
    if expected[1] == 1 or len(expected) == 4:  # det probability map
        assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    else:  # softmax over the last dimension
        torch.testing.assert_close(y.sum(-1), torch.ones(y.shape[:-1]), rtol=0, atol=1e-5)


def test_module_names_follow_paddle_structured_names(models):
    names = {f: set(m.state_dict()) for f, m in models.items()}
    assert {"backbone.conv.conv.weight", "backbone.stage0.0.expand_conv.bn.running_mean",
            "backbone.stage3.3.conv.weight", "neck.in2_conv.weight", "neck.p5_conv.weight",
            "head.binarize.conv_bn1.running_var", "head.thresh.conv3.bias"} <= names["ppocr_mobile_v2.0_det"]
    assert {"backbone.conv1_1._conv.weight", "backbone.bb_1_0.short._batch_norm.weight",
            "backbone.bb_3_1.conv1._conv.weight"} <= names["ppocr_server_v2.0_det"]
    assert {"neck.ins_conv.3.se_block.conv2.bias", "neck.inp_conv.0.in_conv.weight"} <= names["PP-OCRv3_det"]
    assert {"backbone.blocks.10.mid_se.conv1.weight", "neck.encoder.lstm.weight_ih_l1_reverse",
            "head.fc.weight"} <= names["ppocr_mobile_v2.0_rec"]
    assert {"backbone.bb_3_2.conv1._batch_norm.running_mean", "neck.encoder.lstm.bias_hh_l0"} \
        <= names["ppocr_server_v2.0_rec"]
    assert {"backbone.block_list.12._se.conv2.weight", "head.fc1.weight", "head.fc2.bias"} <= names["PP-OCRv2_rec"]
    assert {"head.ctc_encoder.encoder.svtr_block.1.mixer.qkv.weight", "head.ctc_encoder.encoder.conv1x1.norm.weight",
            "head.ctc_head.fc.weight"} <= names["PP-OCRv3_rec"]
    assert {"backbone.conv2.conv.weight", "head.fc.bias"} <= names["ppocr_mobile_v2.0_cls"]
    # the detection backbones of the mobile families have no SE (disable_se) ...
    assert not any("mid_se" in k for k in names["ppocr_mobile_v2.0_det"] | names["PP-OCRv3_det"])
    # ... nor any training-only branch in the recognition models
    assert not any("sar_head" in k for k in names["PP-OCRv3_rec"])


@pytest.mark.parametrize("row,family,file,prefix", [
    ("ch_ppocr_server_v2.0_det", "ppocr_server_v2.0_det", "best_accuracy.pdparams", ""),
    ("ch_ppocr_server_v2.0_rec", "ppocr_server_v2.0_rec", "best_accuracy.pdparams", ""),
    ("ch_PP-OCRv2_det", "PP-OCRv2_det", "best_accuracy.pdparams", "Student."),
    ("ch_PP-OCRv3_det", "PP-OCRv3_det", "student.pdparams", ""),
    ("ch_PP-OCRv3_rec", "PP-OCRv3_rec", "best_accuracy.pdparams", "Student."),
])
def test_tensor_sizes_match_paddle_checkpoint_key_lists(models, fixtures_root, row, family, file, prefix):
    """Every tensor of PaddleOCR's own checkpoint (key list shipped with the fixtures) has a counterpart of
    the same number of elements: same total, same multiset of sizes (training-only SAR head excluded)."""
    import json

    keys = json.loads((fixtures_root / row / "train_keys.json").read_text())["files"][file]
    paddle_sizes = sorted(
        int(torch.tensor(shape).prod()) for key, shape, _dtype, _var, alias in keys
        if alias is None and key.startswith(prefix) and (prefix or "." not in key.split(".")[0])
        and not key[len(prefix):].startswith(("head.sar_head.",)) and "." in key[len(prefix):]
        and not any(key.startswith(p) for p in ("Teacher.", "Student2.") if p != prefix))
    torch_sizes = sorted(v.numel() for k, v in models[family].state_dict().items()
                         if not k.endswith("num_batches_tracked"))
    assert torch_sizes == paddle_sizes


def test_hard_sigmoid_slopes_per_family(models):
    def slopes(model):
        return {round(m.slope, 7) for m in model.modules() if isinstance(m, HardSigmoid)}

    assert slopes(models["ppocr_mobile_v2.0_rec"]) == {0.2}
    assert slopes(models["ppocr_mobile_v2.0_cls"]) == {0.2}
    assert slopes(models["PP-OCRv3_det"]) == {0.2}  # RSEFPN's SE
    assert slopes(models["PP-OCRv2_rec"]) == {0.1666667}
    assert slopes(models["PP-OCRv3_rec"]) == {0.1666667}
    assert slopes(models["ppocr_mobile_v2.0_det"]) == set()


def test_hard_sigmoid_is_not_torchs_for_slope_02():
    x = torch.linspace(-4, 4, 81)
    assert torch.equal(HardSigmoid(0.2, 0.5)(x), torch.clamp(0.2 * x + 0.5, 0, 1))
    assert float((HardSigmoid(0.2, 0.5)(x) - nn.Hardsigmoid()(x)).abs().max()) > 0.08  # 1/12 at x = +-2.5


def test_se_module_scales_channels():
    se = SEModule(8, slope=0.2, offset=0.5)
    for p in se.parameters():
        nn.init.zeros_(p)
    x = torch.rand(2, 8, 5, 7)
    torch.testing.assert_close(se(x), x * 0.5)  # hard_sigmoid(0) = offset


def test_layer_norm_and_batch_norm_epsilons(models):
    svtr = models["PP-OCRv3_rec"].head.ctc_encoder.encoder
    assert [b.norm1.eps for b in svtr.svtr_block] == [1e-5, 1e-5]
    assert svtr.norm.eps == 1e-6
    assert {m.eps for f in CLASSIC for m in models[f].modules() if isinstance(m, nn.BatchNorm2d)} == {1e-5}


def test_resnet_vd_shortcut_pool_is_exclusive_ceil_mode(models):
    pools = [m for m in models["ppocr_server_v2.0_rec"].modules() if isinstance(m, nn.AvgPool2d)]
    assert pools and all(p.ceil_mode and not p.count_include_pad and p.kernel_size == (2, 1) for p in pools)
    det_pools = [m for m in models["ppocr_server_v2.0_det"].modules() if isinstance(m, nn.AvgPool2d)]
    assert len(det_pools) == 3 and all(p.kernel_size == 2 and p.ceil_mode for p in det_pools)
    # exclusive: a 3x3 input pooled 2x2 with ceil mode averages only the real pixels of the last window
    x = torch.arange(9.0).reshape(1, 1, 3, 3)
    assert float(det_pools[0](x)[0, 0, 1, 1]) == 8.0


def test_make_divisible_matches_paddle():
    assert [make_divisible(16 * s) for s in (0.35, 0.5, 1.0)] == [8, 8, 16]
    assert make_divisible(0.5 * 960) == 480 and make_divisible(0.35 * 576) == 200


def test_db_head_training_output_and_optional_threshold():
    head = architectures.build(architectures.family_config("ppocr_mobile_v2.0_det")).head
    x = torch.rand(1, 96, 8, 8)
    head.train()
    out = head(x)
    assert out.shape == (1, 3, 32, 32)
    torch.testing.assert_close(out[:, 2], torch.sigmoid(50 * (out[:, 0] - out[:, 1])), rtol=1e-4, atol=1e-5)
    head.eval()
    assert head(x).shape == (1, 1, 32, 32)
    no_thresh = architectures.build(architectures.family_config("ppocr_mobile_v2.0_det",
                                                                 head={"use_threshold": False}))
    assert not any(k.startswith("head.thresh.") for k in no_thresh.state_dict())


def test_ctc_and_cls_heads_return_logits_in_training_mode(models):
    rec = architectures.build(architectures.family_config("ppocr_mobile_v2.0_rec", head={"out_channels": 11}))
    rec.train()
    logits = rec(torch.rand(2, 3, 32, 64))
    assert logits.shape == (2, 16, 11) and not torch.allclose(logits.sum(-1), torch.ones(2, 16))


def test_batch_elements_are_independent(models):
    # batch 2 must give the same result as two batch-1 runs (no mixing across the batch, e.g. in the LSTM)
    for family, shape in (("ppocr_mobile_v2.0_rec", (2, 3, 32, 64)), ("PP-OCRv3_rec", (2, 3, 48, 64)),
                          ("PP-OCRv3_det", (2, 3, 64, 64))):
        x = torch.rand(shape)
        with torch.no_grad():
            both = models[family](x)
            single = torch.cat([models[family](x[i:i + 1]) for i in range(2)])
        torch.testing.assert_close(both, single, rtol=0, atol=1e-5)


def test_invalid_hyper_parameters_are_reported():
    with pytest.raises(ValueError, match="scale"):
        architectures.build(architectures.family_config("ppocr_mobile_v2.0_cls", backbone={"scale": 0.3}))
    with pytest.raises(ValueError, match="unknown backbone"):
        architectures.build(architectures.family_config("ppocr_mobile_v2.0_cls", backbone={"name": "NoSuchNet"}))


def test_inference_fast_path_folds_batch_norm_and_follows_weight_changes():
    from architectures.layers import ConvBNLayer

    torch.manual_seed(1)
    layer = ConvBNLayer(8, 16, 3, act="hardswish", conv_name="_conv", bn_name="_batch_norm").eval()
    bn = layer._batch_norm
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    x = torch.rand(2, 8, 9, 11)

    def reference():
        with torch.enable_grad():  # the plain conv -> BN path
            return layer(x).detach()

    with torch.no_grad():
        fast = layer(x)
    torch.testing.assert_close(fast, reference(), rtol=0, atol=1e-5)
    assert set(layer.state_dict()) == {"_conv.weight", "_batch_norm.weight", "_batch_norm.bias",
                                       "_batch_norm.running_mean", "_batch_norm.running_var",
                                       "_batch_norm.num_batches_tracked"}
    # in-place updates (load_state_dict copies) and replaced tensors both invalidate the folded weights
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["_batch_norm.running_mean"] += 0.25
    layer.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference(), rtol=0, atol=1e-5)
        assert not torch.allclose(layer(x), fast, atol=1e-3)
    layer.double()
    with torch.no_grad():
        assert layer(x.double()).dtype == torch.float64
    # gradients still reach the convolution in eval mode (frozen-BN fine-tuning)
    layer.float()
    loss = layer(x).sum()
    loss.backward()
    assert layer._conv.weight.grad is not None and float(layer._conv.weight.grad.abs().sum()) > 0


def test_pointwise_fast_path_on_channels_last_input_equals_the_convolution():
    from architectures.layers import ConvBNLayer

    torch.manual_seed(2)
    layer = ConvBNLayer(16, 24, 1, act="relu").eval()
    with torch.no_grad():
        layer.bn.running_mean.uniform_(-1, 1)
        layer.bn.bias.uniform_(-0.5, 0.5)
    x = torch.randn(3, 16, 5, 7).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        fast = layer(x)
    with torch.enable_grad():
        reference = layer(x.contiguous()).detach()
    assert fast.shape == (3, 24, 5, 7)
    torch.testing.assert_close(fast, reference, rtol=0, atol=1e-5)
