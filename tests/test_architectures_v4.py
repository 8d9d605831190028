"""PP-OCRv4 architectures: configs, module names, shapes, PPLCNetV3 re-parameterization, PFHeadLocal outputs,
and the numpy post-processing helpers (CTC greedy decode, DB regions). No Paddle, no fixtures needed except the
shipped key lists."""
from __future__ import annotations

import json
from collections import deque

import numpy as np
import pytest
import torch
from torch import nn

import architectures
from architectures.backbones.pphgnet import PPHGNet_small
from architectures.backbones.pplcnetv3 import LearnableRepLayer, PPLCNetV3
from architectures.heads.pfhead import PFHeadLocal
from architectures.layers import PADDLE_HARDSIGMOID_SLOPE, HardSigmoid
from architectures.necks.lkpan import LKPAN, IntraCLBlock
from architectures.postprocess import connected_regions, ctc_greedy_decode, db_regions, load_character_list
from model_helpers import randomize_batch_norms

V4 = ["PP-OCRv4_mobile_det", "PP-OCRv4_server_det", "PP-OCRv4_mobile_rec", "PP-OCRv4_server_rec"]


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {family: architectures.build(architectures.family_config(family)) for family in V4}


def test_v4_families_are_registered_with_the_shared_schema():
    assert set(V4) <= set(architectures.FAMILIES)
    expected = {
        "PP-OCRv4_mobile_det": ("PPLCNetV3", "RSEFPN", "DBHead"),
        "PP-OCRv4_server_det": ("PPHGNet_small", "LKPAN", "PFHeadLocal"),
        "PP-OCRv4_mobile_rec": ("PPLCNetV3", None, "MultiHead"),
        "PP-OCRv4_server_rec": ("PPHGNet_small", None, "MultiHead"),
    }
    for family, (backbone, neck, head) in expected.items():
        config = architectures.family_config(family)
        assert config["family"] == family and config["form"] == "deploy"
        assert config["backbone"]["name"] == backbone
        assert (config["neck"] or {}).get("name") == neck
        assert config["head"]["name"] == head
        assert {"task", "preprocess", "postprocess"} <= set(config)
    assert architectures.family_config("PP-OCRv4_mobile_det")["backbone"]["scale"] == 0.75
    assert architectures.family_config("PP-OCRv4_mobile_rec")["backbone"]["scale"] == 0.95
    assert architectures.family_config("PP-OCRv4_server_det")["neck"] == {
        "name": "LKPAN", "out_channels": 256, "intracl": True}
    assert architectures.family_config("PP-OCRv4_server_det")["head"]["mode"] == "large"


@pytest.mark.parametrize("family,shape,expected", [
    ("PP-OCRv4_mobile_det", (1, 3, 320, 320), [(1, 1, 320, 320)]),
    ("PP-OCRv4_mobile_det", (2, 3, 96, 160), [(2, 1, 96, 160)]),
    ("PP-OCRv4_server_det", (1, 3, 64, 96), [(1, 1, 64, 96), (1, 1, 64, 96)]),
    ("PP-OCRv4_mobile_rec", (2, 3, 48, 320), [(2, 40, 6625)]),
    ("PP-OCRv4_mobile_rec", (1, 3, 48, 100), [(1, 12, 6625)]),
    ("PP-OCRv4_server_rec", (1, 3, 48, 160), [(1, 20, 6625)]),
])
def test_eval_output_shapes_and_ranges(models, family, shape, expected):
    with torch.no_grad():
        out = models[family](torch.rand(shape))
    outs = list(out) if isinstance(out, tuple) else [out]
    assert [tuple(o.shape) for o in outs] == expected
    for o in outs:
        if family.endswith("_det"):
            assert 0.0 <= float(o.min()) and float(o.max()) <= 1.0
        else:
            torch.testing.assert_close(o.sum(-1), torch.ones(o.shape[:-1]), rtol=0, atol=1e-5)


def _paddle_to_torch_name(key: str) -> str:
    return key.replace("._mean", ".running_mean").replace("._variance", ".running_var")


@pytest.mark.parametrize("row,family,dropped", [
    ("ch_PP-OCRv4_rec", "PP-OCRv4_mobile_rec", r"head\.(gtc_head|before_gtc)\."),
    ("en_PP-OCRv4_rec", "PP-OCRv4_mobile_rec", r"head\.(gtc_head|before_gtc)\."),
    ("ch_PP-OCRv4_server_rec", "PP-OCRv4_server_rec", r"head\.(gtc_head|before_gtc)\."),
    ("ch_PP-OCRv4_server_det", "PP-OCRv4_server_det", None),
])
def test_training_form_names_and_shapes_equal_paddle_checkpoint_keys(fixtures_root, row, family, dropped):
    """Every key of PaddleOCR's own trained checkpoint (minus the training-only NRTR branch) exists in the
    training-form module with the same shape (Linear weights transposed), and nothing else does."""
    import re

    files = json.loads((fixtures_root / row / "train_keys.json").read_text())["files"]
    (keys,) = files.values()
    paddle = {_paddle_to_torch_name(k): tuple(shape) for k, shape, *_ in keys
              if not (dropped and re.match(dropped, k))}
    classes = next(shape[0] for k, shape in paddle.items() if k == "head.ctc_head.fc.bias") if "rec" in family else 0
    overrides = {"form": "train"}
    if classes:
        overrides["head"] = {"out_channels": classes}
    with torch.device("meta"):
        model = architectures.build(architectures.family_config(family, **overrides))
    linear = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    ours = {}
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue
        shape = tuple(v.shape)
        ours[k] = shape[::-1] if k.rpartition(".")[0] in linear and len(shape) == 2 else shape
    assert ours == paddle


def test_mobile_det_training_form_equals_the_full_fixture_checkpoint(fixtures_root):
    from converter import paddle_io

    weights = paddle_io.load(fixtures_root / "ch_PP-OCRv4_det" / "ch_PP-OCRv4_det_train.tar")
    model = architectures.build(architectures.family_config("PP-OCRv4_mobile_det", form="train"))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    theirs = {_paddle_to_torch_name(k): tuple(v.shape) for k, v in weights.items()}
    # PaddleOCR builds an activation for the integer-stride-2 depthwise layers but never runs it
    unused = {k for k in theirs if k.startswith(tuple(f"backbone.blocks{i}.0.dw_conv.act." for i in range(3, 7)))}
    assert len(unused) == 8
    assert ours == {k: v for k, v in theirs.items() if k not in unused}


def test_deploy_form_names(models):
    names = set(models["PP-OCRv4_mobile_det"].state_dict())
    assert {"backbone.conv1.conv.weight", "backbone.blocks2.0.dw_conv.reparam_conv.bias",
            "backbone.blocks6.0.se.conv2.weight", "backbone.blocks6.3.pw_conv.act.lab.scale",
            "backbone.layer_list.3.weight", "neck.ins_conv.3.se_block.conv1.bias",
            "head.binarize.conv3.weight"} <= names
    assert not any(".conv_kxk." in n or ".conv_1x1." in n or ".identity." in n for n in names)
    assert "backbone.blocks3.0.dw_conv.act.lab.scale" not in names  # integer stride 2: no activation
    names = set(models["PP-OCRv4_server_det"].state_dict())
    assert {"backbone.stem.2.conv.weight", "backbone.stages.2.blocks.1.layers.5.bn.running_var",
            "backbone.stages.1.downsample.conv.weight", "backbone.stages.0.blocks.0.att.conv.bias",
            "neck.incl4.c_layer_7x7.weight", "neck.pan_lat_conv.3.weight", "neck.pan_head_conv.2.weight",
            "head.cbn_layer.last_3.conv.weight", "head.cbn_layer.last_1.bias"} <= names
    assert "backbone.stages.0.downsample.conv.weight" not in names  # det stage 1 does not down-sample
    assert "backbone.stages.0.downsample.conv.weight" in set(models["PP-OCRv4_server_rec"].state_dict())


def test_activation_is_skipped_only_for_an_integer_stride_2():
    int2 = LearnableRepLayer(8, 8, 3, stride=2, groups=8)
    tuple21 = LearnableRepLayer(8, 8, 3, stride=(2, 1), groups=8)
    int1 = LearnableRepLayer(8, 8, 3, stride=1, groups=8)
    assert not int2.apply_act and not hasattr(int2, "act")
    assert tuple21.apply_act and int1.apply_act
    # the identity BN branch exists only for an integer stride 1 with equal channels
    assert int1.has_identity and not tuple21.has_identity and not int2.has_identity
    assert not LearnableRepLayer(8, 16, 1).has_identity
    x = torch.randn(1, 8, 6, 6)
    tuple21 = randomize_batch_norms(tuple21).eval()
    with torch.no_grad():
        tuple21.act.lab.scale.fill_(2.0)
        tuple21.act.lab.bias.fill_(-1.0)
        pre_act = tuple21.lab(sum(branch(x) for branch in [tuple21.conv_1x1, *tuple21.conv_kxk]))
        torch.testing.assert_close(tuple21(x), 2.0 * nn.functional.hardswish(pre_act) - 1.0)
        assert tuple(tuple21(x).shape) == (1, 8, 3, 6)


def test_pplcnetv3_se_uses_paddles_hard_sigmoid_and_rsefpn_uses_slope_02(models):
    backbone_slopes = {m.slope for n, m in models["PP-OCRv4_mobile_det"].named_modules()
                       if isinstance(m, HardSigmoid) and n.startswith("backbone.")}
    neck_slopes = {m.slope for n, m in models["PP-OCRv4_mobile_det"].named_modules()
                   if isinstance(m, HardSigmoid) and n.startswith("neck.")}
    assert backbone_slopes == {PADDLE_HARDSIGMOID_SLOPE} and abs(PADDLE_HARDSIGMOID_SLOPE - 1 / 6) < 1e-6
    assert neck_slopes == {0.2}


@pytest.mark.parametrize("det,scale,shape,expected", [
    (True, 0.75, (1, 3, 64, 96), [(1, 12, 16, 24), (1, 18, 8, 12), (1, 42, 4, 6), (1, 360, 2, 3)]),
    (False, 0.95, (2, 3, 48, 320), [(2, 480, 1, 40)]),
])
def test_reparameterize_matches_the_training_form(det, scale, shape, expected):
    """Fusion is exact: float64 agreement to 1e-10; float32 within round-off."""
    torch.manual_seed(1)
    model = randomize_batch_norms(PPLCNetV3(scale=scale, det=det, form="train")).eval()
    with torch.no_grad():
        for lab in [m for m in model.modules() if m.__class__.__name__ == "LearnableAffineBlock"]:
            lab.scale.uniform_(0.5, 1.5)
            lab.bias.normal_(0.0, 0.1)
    x = torch.rand(shape)
    with torch.no_grad():
        train32 = model(x)
        train64 = model.double()(x.double())
        model.reparameterize()
        fused64 = model(x.double())
        fused32 = model.float()(x)
    train32 = train32 if det else [train32]
    train64, fused64, fused32 = ([t] if not det else t for t in (train64, fused64, fused32))
    assert [tuple(t.shape) for t in fused32] == expected
    for a, b in zip(train64, fused64):
        assert float((a - b).abs().max()) <= 1e-10 * max(1.0, float(a.abs().max()))
    for a, b in zip(train32, fused32):
        assert float((a - b).abs().max()) <= 1e-4 * max(1.0, float(a.abs().max()))
    assert model.form == "deploy"
    assert not any(".conv_kxk." in k or ".conv_1x1." in k or ".identity." in k for k in model.state_dict())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.reparameterize()  # idempotent
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_deploy_layer_inference_cache_follows_parameter_changes():
    """The inference fast path caches lab-folded kernels; in-place edits and load_state_dict must reach it."""
    torch.manual_seed(4)
    layer = LearnableRepLayer(6, 6, 3, stride=1, groups=6, form="deploy").eval()
    x = torch.randn(2, 6, 5, 7)

    def reference():
        with torch.enable_grad():  # the uncached path
            return layer(x).detach()

    with torch.no_grad():
        layer.lab.scale.fill_(1.5)
        first = layer(x)
        torch.testing.assert_close(first, reference())
        layer.lab.scale.mul_(2.0)
        layer.reparam_conv.bias.add_(0.25)
        torch.testing.assert_close(layer(x), reference())
        assert not torch.allclose(layer(x), first)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["lab.bias"] = torch.tensor([0.75])
    layer.load_state_dict(state)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), reference())


def test_fused_kernel_layout_for_depthwise_and_pointwise_layers():
    layer = randomize_batch_norms(LearnableRepLayer(4, 4, 5, stride=1, groups=4, num_conv_branches=2)).eval()
    kernel, bias = layer.fused_kernel_bias()
    assert kernel.dtype == torch.float64 and tuple(kernel.shape) == (4, 1, 5, 5) and tuple(bias.shape) == (4,)
    # the identity branch is a one-hot at the centre, scaled by its BN: check it against a manual fusion
    bn = layer.identity
    identity_scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).double()
    others = sum(branch.bn.weight.double() / torch.sqrt(branch.bn.running_var.double() + branch.bn.eps)
                 * branch.conv.weight.double()[:, 0, 2, 2] for branch in layer.conv_kxk)
    one_by_one = layer.conv_1x1
    others = others + (one_by_one.bn.weight.double() / torch.sqrt(one_by_one.bn.running_var.double() + 1e-5)
                       * one_by_one.conv.weight.double()[:, 0, 0, 0])
    torch.testing.assert_close(kernel[:, 0, 2, 2], others + identity_scale)
    pointwise = randomize_batch_norms(LearnableRepLayer(4, 6, 1, num_conv_branches=3)).eval()
    assert not hasattr(pointwise, "conv_1x1") and not pointwise.has_identity
    assert tuple(pointwise.fused_kernel_bias()[0].shape) == (6, 4, 1, 1)


def test_rec_backbones_pool_with_kernel_3x2_in_eval_and_to_40_steps_in_training():
    for backbone in (PPLCNetV3(scale=0.95, form="deploy"), PPHGNet_small()):
        x = torch.rand(1, 3, 48, 200)
        with torch.no_grad():
            assert tuple(backbone.eval()(x).shape)[2:] == (1, 25)
            assert tuple(backbone.train()(x).shape)[2:] == (1, 40)


def test_pphgnet_small_channels_and_det_strides():
    det = PPHGNet_small(det=True).eval()
    assert det.out_channels == [256, 512, 768, 1024]
    with torch.no_grad():
        shapes = [tuple(f.shape) for f in det(torch.rand(1, 3, 64, 64))]
    assert shapes == [(1, 256, 16, 16), (1, 512, 8, 8), (1, 768, 4, 4), (1, 1024, 2, 2)]
    assert PPHGNet_small().out_channels == 1024


def test_lkpan_applies_intracl_blocks_and_rejects_lite_mode():
    torch.manual_seed(2)
    neck = randomize_batch_norms(LKPAN([8, 16, 24, 32], 32, intracl=True)).eval()
    plain = LKPAN([8, 16, 24, 32], 32, intracl=False).eval()
    plain.load_state_dict({k: v for k, v in neck.state_dict().items() if not k.startswith("incl")})
    feats = [torch.rand(1, c, 32 // 2 ** i, 32 // 2 ** i) for i, c in enumerate([8, 16, 24, 32])]
    with torch.no_grad():
        out, out_plain = neck(feats), plain(feats)
    assert tuple(out.shape) == (1, 32, 32, 32)
    assert not torch.allclose(out, out_plain)
    with torch.no_grad():  # zeroing the IntraCL BN scale and shift makes each block the identity
        for block in (neck.incl1, neck.incl2, neck.incl3, neck.incl4):
            block.bn.weight.zero_()
            block.bn.bias.zero_()
        torch.testing.assert_close(neck(feats), out_plain)
    with pytest.raises(ValueError, match="lite"):
        LKPAN([8, 16, 24, 32], 32, mode="lite")


def test_lkpan_takes_channels_last_maps_with_gradients_and_in_training():
    """Its blocked NCHW copy (an inference fast path) ran on every call: with channels-last maps and gradients on
    (fine-tuning, or exporting to ONNX) it raised "a view was created in no_grad mode and is being modified"."""
    torch.manual_seed(4)
    neck = randomize_batch_norms(LKPAN([8, 16, 24, 32], 32, intracl=True)).eval()
    feats = [torch.rand(1, c, 32 // 2 ** i, 32 // 2 ** i) for i, c in enumerate([8, 16, 24, 32])]
    last = [f.contiguous(memory_format=torch.channels_last) for f in feats]
    with torch.no_grad():
        expected = neck(feats)
    torch.testing.assert_close(neck(last), expected, rtol=1e-5, atol=1e-5)
    neck.train()
    neck(last).sum().backward()
    assert neck.inp_conv[0].weight.grad is not None


def test_intracl_block_kernels():
    block = IntraCLBlock(16, reduce_factor=2)
    shapes = {n: tuple(m.weight.shape) for n, m in block.named_children() if isinstance(m, nn.Conv2d)}
    assert shapes["v_layer_7x1"] == (8, 8, 7, 1) and shapes["q_layer_1x5"] == (8, 8, 1, 5)
    assert shapes["c_layer_3x3"] == (8, 8, 3, 3) and shapes["conv1x1_return_channel"] == (16, 8, 1, 1)


def test_pfheadlocal_returns_cbn_maps_then_their_average_with_the_base_map():
    torch.manual_seed(3)
    head = randomize_batch_norms(PFHeadLocal(32, mode="large", use_threshold=False)).eval()
    x = torch.rand(2, 32, 8, 8)
    with torch.no_grad():
        cbn_maps, maps = head(x)
        base, feature = head.binarize(x, return_f=True)
        up = nn.functional.interpolate(feature, scale_factor=2.0, mode="nearest")
        cbn_layer = head.cbn_layer
        expected_cbn = torch.sigmoid(cbn_layer.last_1(cbn_layer.last_3(torch.cat([base, up], dim=1))))
    assert tuple(cbn_maps.shape) == tuple(maps.shape) == (2, 1, 32, 32)
    torch.testing.assert_close(cbn_maps, expected_cbn, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(maps, 0.5 * (base + cbn_maps))
    assert tuple(head.cbn_layer.last_3.conv.weight.shape) == (8, 9, 3, 3)
    assert tuple(PFHeadLocal(32, mode="small").cbn_layer.last_3.conv.weight.shape) == (4, 9, 3, 3)
    trainable = randomize_batch_norms(PFHeadLocal(32, mode="large")).train()
    out = trainable(x)
    assert tuple(out.shape) == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="mode"):
        PFHeadLocal(32, mode="medium")


def test_batch_elements_are_independent(models):
    for family in ("PP-OCRv4_mobile_rec", "PP-OCRv4_server_det"):
        shape = (2, 3, 48, 96) if family.endswith("rec") else (2, 3, 64, 64)
        x = torch.rand(shape)
        with torch.no_grad():
            both, single = models[family](x), models[family](x[1:])
        both = both if isinstance(both, tuple) else (both,)
        single = single if isinstance(single, tuple) else (single,)
        for a, b in zip(both, single):
            torch.testing.assert_close(a[1:], b, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------ postprocess


def test_ctc_greedy_decode_collapses_repeats_and_drops_blanks():
    characters = ["a", "b", "c", " "]
    steps = [1, 1, 0, 1, 2, 2, 0, 0, 4, 3]  # a a _ a b b _ _ ' ' c
    probs = np.full((1, len(steps), 5), 0.01, np.float32)
    probs[0, np.arange(len(steps)), steps] = np.linspace(0.5, 0.95, len(steps))
    (result,) = ctc_greedy_decode(probs, characters)
    assert result.text == "aab c"
    assert result.indices == (1, 1, 2, 4, 3)
    kept = [0, 3, 4, 8, 9]
    assert result.score == pytest.approx(float(np.linspace(0.5, 0.95, len(steps))[kept].mean()))
    (empty,) = ctc_greedy_decode(torch.zeros(1, 3, 5).index_fill_(2, torch.tensor([0]), 1.0), characters)
    assert empty.text == "" and empty.score == 0.0
    with pytest.raises(ValueError, match="does not fit"):
        ctc_greedy_decode(np.zeros((1, 2, 9)), characters)


def test_ctc_greedy_decode_blank_index_dictionary_length_and_dtypes():
    characters = ["a", "b", "c", " "]
    probs = np.full((1, 4, 5), 0.01, np.float32)
    probs[0, np.arange(4), [0, 1, 4, 2]] = 0.96
    # blank last: the other classes keep their order, class 0 is the first character (not characters[-1])
    (result,) = ctc_greedy_decode(probs, characters, blank=4)
    assert result.text == "abc" and result.indices == (0, 1, 2)
    with pytest.raises(ValueError, match="blank index 5 is outside the model's 5 classes"):
        ctc_greedy_decode(probs, characters, blank=5)
    with pytest.raises(ValueError, match="the model has 5 classes but the character list has 5 characters"):
        ctc_greedy_decode(probs, characters + ["x"])  # longer than the classes
    with pytest.raises(ValueError, match="characters is None"):
        ctc_greedy_decode(probs, None)
    expected = ctc_greedy_decode(probs, characters)[0]
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        (got,) = ctc_greedy_decode(torch.from_numpy(probs).to(dtype).requires_grad_(), characters)
        assert got.text == expected.text == "a b" and got.score == pytest.approx(expected.score, abs=1e-2)


def test_db_regions_take_bfloat16_and_the_server_dets_output_tuple():
    prob = torch.zeros(1, 1, 8, 12)
    prob[0, 0, 2:5, 3:9] = 0.9
    expected = [[((3, 2, 8, 4), 18)]]
    for value in (prob.bfloat16(), (prob, torch.zeros_like(prob))):  # (cbn_maps, maps): PaddleOCR uses the first
        assert [[(r.box, r.area) for r in regions] for regions in db_regions(value)] == expected


def test_load_character_list_appends_the_space(tmp_path):
    path = tmp_path / "dict.txt"
    path.write_bytes("a\r\nb\n中\n".encode())
    assert load_character_list(path) == ["a", "b", "中", " "]
    assert load_character_list(path, use_space_char=False) == ["a", "b", "中"]


def _bfs_regions(mask: np.ndarray) -> list[tuple]:
    seen = np.zeros_like(mask)
    out = []
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        queue, pixels = deque([(y, x)]), []
        seen[y, x] = True
        while queue:
            cy, cx = queue.popleft()
            pixels.append((cy, cx))
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        ys, xs = zip(*pixels)
        out.append((min(xs), min(ys), max(xs), max(ys), len(pixels)))
    return sorted(out)


def test_connected_regions_match_a_flood_fill():
    rng = np.random.RandomState(0)
    for threshold in (0.35, 0.5, 0.6, 0.75):
        mask = rng.rand(40, 57) > threshold
        assert sorted((*r.box, r.area) for r in connected_regions(mask)) == _bfs_regions(mask)
    prob = np.zeros((1, 1, 20, 30), np.float32)
    prob[0, 0, 2:5, 3:20] = 0.9
    prob[0, 0, 10:14, 5:8] = 0.31
    prob[0, 0, 16, 0] = 0.99  # below min_area
    (regions,) = db_regions(prob, thresh=0.3, min_area=4)
    assert [(r.box, r.area) for r in regions] == [((3, 2, 19, 4), 51), ((5, 10, 7, 13), 12)]
