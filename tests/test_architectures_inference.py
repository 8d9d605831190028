"""The CPU inference fast paths (fused oneDNN convolutions, folded batch norms, in-place sums, upsampling without
temporaries) against the plain module computations they replace."""
from __future__ import annotations

import copy
import io
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from architectures.backbones.pphgnet import HGBlock
from architectures.backbones.resnet_vd import BasicBlock, BottleneckBlock, VdConvBNLayer
from architectures.heads.db_head import DBHead, patchwise_conv_transpose2d
from architectures.heads.pfhead import LocalModule, PFHeadLocal
from architectures.layers import ConvBNLayer, DerivedTensors, SEModule, contiguous_nchw, fused_conv2d
from architectures.necks.db_fpn import add_upsampled, concat_pyramid
from architectures.necks.lkpan import IntraCLBlock

CL = torch.channels_last


def randomize_batch_norms(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so that folding them matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
    return module.eval()


def reference(module: nn.Module, *args, **kwargs):
    """The plain eval-mode computation: with gradients enabled no fast path runs."""
    with torch.enable_grad():
        out = module(*args, **kwargs)
    return tuple(o.detach() for o in out) if isinstance(out, tuple) else out.detach()


@pytest.mark.parametrize("act", [None, "relu", "hardswish", "swish", "sigmoid"])
@pytest.mark.parametrize("groups", [1, 6])
def test_fused_convolution_equals_convolution_then_activation(act, groups):
    torch.manual_seed(0)
    layer = randomize_batch_norms(ConvBNLayer(6, 12, 3, stride=(2, 1), groups=groups, act=act))
    for x in (torch.randn(2, 6, 9, 13), torch.randn(2, 6, 9, 13).contiguous(memory_format=CL)):
        with torch.inference_mode():
            fast = layer(x)
        torch.testing.assert_close(fast, reference(layer, x), rtol=0, atol=1e-5)


def test_packed_weights_follow_input_shape_and_weight_changes():
    torch.manual_seed(1)
    layer = randomize_batch_norms(ConvBNLayer(8, 16, 3, act="relu"))
    small, large = torch.randn(1, 8, 6, 10), torch.randn(3, 8, 11, 7)
    with torch.no_grad():
        for x in (small, large, small):  # re-packed for every new input shape
            torch.testing.assert_close(layer(x), reference(layer, x), rtol=0, atol=1e-5)
        before = layer(small)
        layer.conv.weight.mul_(1.5)  # an in-place edit invalidates the folded and the packed weights
        after = layer(small)
    torch.testing.assert_close(after, reference(layer, small), rtol=0, atol=1e-5)
    assert not torch.allclose(after, before, atol=1e-3)


def test_models_with_cached_inference_weights_can_be_copied_and_saved():
    torch.manual_seed(2)
    layer = randomize_batch_norms(ConvBNLayer(4, 8, 3, act="hardswish"))
    x = torch.randn(1, 4, 8, 8)
    with torch.inference_mode():
        expected = layer(x)  # fills the folded-weight and oneDNN-packed caches
    clone = copy.deepcopy(layer)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert isinstance(clone._packed, DerivedTensors) and clone._packed._entry is None  # caches start empty
    with torch.inference_mode():
        torch.testing.assert_close(clone(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)


def test_fused_residual_sum_and_relu():
    torch.manual_seed(3)
    weight, bias = torch.randn(8, 8, 3, 3), torch.randn(8)
    x, residual = torch.randn(2, 8, 7, 9), torch.randn(2, 8, 7, 9)
    expected = F.relu(residual + F.conv2d(x, weight, bias, 1, 1))
    with torch.no_grad():
        fused = fused_conv2d(x, weight, bias, 1, 1, 1, 1, "relu", F.relu_, residual=residual)
        packed = fused_conv2d(x, weight, bias, 1, 1, 1, 1, "relu", F.relu_, DerivedTensors(), residual)
    torch.testing.assert_close(fused, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(packed, expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="without activation"):
        ConvBNLayer(8, 8, 3, act="relu").eval().forward_residual(x, residual)


@pytest.mark.parametrize("block_cls, stride", [(BasicBlock, 1), (BasicBlock, 2), (BottleneckBlock, (2, 1))])
def test_resnet_blocks_fuse_the_shortcut_sum(block_cls, stride):
    torch.manual_seed(4)
    expansion = 4 if block_cls is BottleneckBlock else 1
    short = VdConvBNLayer(8, 8 * expansion, 1, vd_pool=stride if stride != 1 else None)
    block = randomize_batch_norms(block_cls(8, 8, stride, shortcut=False, short=short))
    x = torch.randn(2, 8, 10, 12)
    with torch.inference_mode():
        fast = block(x)
    torch.testing.assert_close(fast, reference(block, x), rtol=0, atol=1e-5)


def test_in_place_squeeze_excitation_and_hg_block():
    torch.manual_seed(5)
    se, se_inplace = SEModule(16, slope=0.2), SEModule(16, slope=0.2, inplace=True)
    se_inplace.load_state_dict(se.state_dict())
    x = torch.randn(2, 16, 5, 7)
    expected = reference(se.eval(), x)
    fresh = x.clone()
    with torch.no_grad():
        torch.testing.assert_close(se(x), expected, rtol=0, atol=1e-6)
        out = se_inplace.eval()(fresh)
    assert out.data_ptr() == fresh.data_ptr()  # scaled in place: no new feature map
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    block = randomize_batch_norms(HGBlock(16, 8, 16, layer_num=2, identity=True))
    with torch.no_grad():
        torch.testing.assert_close(block(x), reference(block, x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, CL])
def test_fpn_sums_and_concatenation_without_upsampled_temporaries(memory_format):
    torch.manual_seed(6)
    levels = [torch.randn(1, 4, 16 // 2 ** i, 24 // 2 ** i).contiguous(memory_format=memory_format)
              for i in range(4)]
    lateral, top = levels[0].clone(), levels[1]
    expected_sum = lateral + F.interpolate(top, scale_factor=2, mode="nearest")
    with torch.no_grad():
        summed = add_upsampled(lateral, top, in_place=True)
        pyramid = concat_pyramid(*levels, fast=True)
        plain = concat_pyramid(*levels, fast=False)  # what tracers and the ONNX exporter see
    assert summed.data_ptr() == lateral.data_ptr()
    torch.testing.assert_close(summed, expected_sum, rtol=0, atol=0)
    assert add_upsampled(levels[0], top, in_place=False).data_ptr() != levels[0].data_ptr()
    expected = torch.cat([F.interpolate(levels[3], scale_factor=8), F.interpolate(levels[2], scale_factor=4),
                          F.interpolate(levels[1], scale_factor=2), levels[0]], dim=1)
    torch.testing.assert_close(pyramid, expected, rtol=0, atol=0)
    torch.testing.assert_close(plain, expected, rtol=0, atol=0)
    assert pyramid.is_contiguous(memory_format=memory_format)


def test_patchwise_transposed_convolution():
    torch.manual_seed(7)
    for in_channels, out_channels, kernel in ((8, 1, 2), (6, 3, 2), (5, 2, 3)):
        conv = nn.ConvTranspose2d(in_channels, out_channels, kernel, stride=kernel)
        for x in (torch.randn(2, in_channels, 5, 7), torch.randn(2, in_channels, 5, 7).contiguous(memory_format=CL)):
            with torch.no_grad():
                torch.testing.assert_close(patchwise_conv_transpose2d(x, conv), conv(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("head_cls", [DBHead, PFHeadLocal])
def test_db_heads_fold_batch_norms_and_upsample_in_place(head_cls):
    torch.manual_seed(8)
    head = randomize_batch_norms(head_cls(16, use_threshold=False))
    x = torch.rand(1, 16, 6, 8).contiguous(memory_format=CL)
    with torch.inference_mode():
        fast = head(x)
    expected = reference(head, x)
    if head_cls is DBHead:
        fast, expected = (fast,), (expected,)
    for got, want in zip(fast, expected):
        assert got.shape == (1, 1, 24, 32)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("band_rows", [1, 4, 5, 32])
@pytest.mark.parametrize("scale", [1, 2, 4])
def test_local_module_in_bands_equals_the_whole_map(band_rows, scale):
    """Bands of any height (halo rows inside the image, zero rows at its borders, a shorter last band) give the
    whole-map computation; a NCHW or channels-last feature, a batch of two."""
    torch.manual_seed(9)
    module = randomize_batch_norms(LocalModule(6, 5))
    module.band_rows = band_rows
    init_map = torch.rand(2, 1, 8 * scale, 3 * scale)
    for feature in (torch.randn(2, 6, 8, 3), torch.randn(2, 6, 8, 3).contiguous(memory_format=CL)):
        with torch.inference_mode():
            fast = module(feature, init_map, feature_scale=scale)
        assert fast.shape == (2, 1, 8 * scale, 3 * scale)
        torch.testing.assert_close(fast, reference(module, feature, init_map, feature_scale=scale), rtol=0, atol=1e-5)


def test_forward_padded_follows_the_padding_and_is_inference_only():
    torch.manual_seed(10)
    layer = randomize_batch_norms(ConvBNLayer(4, 6, 3, act="relu"))
    x = torch.randn(1, 4, 7, 9)
    padded = F.pad(x, (0, 0, 1, 1))  # the rows' padding given as zero halo rows
    with torch.no_grad():
        whole = layer(x)
        for _ in range(2):  # the packed weight is re-made when the padding changes, with the same input shape
            torch.testing.assert_close(layer.forward_padded(padded, (0, 1)), whole, rtol=0, atol=1e-5)
            torch.testing.assert_close(layer.forward_padded(x, (1, 1)), whole, rtol=0, atol=1e-5)
    with pytest.raises(RuntimeError, match="inference path"):
        layer.forward_padded(x, (1, 1))  # gradients on


def test_intracl_block_runs_each_stage_as_one_convolution():
    torch.manual_seed(11)
    block = randomize_batch_norms(IntraCLBlock(8, reduce_factor=2))
    with torch.no_grad():
        for conv in block.modules():
            if isinstance(conv, nn.Conv2d):
                conv.bias.uniform_(-0.5, 0.5)
    for x in (torch.randn(2, 8, 11, 13), torch.randn(2, 8, 11, 13).contiguous(memory_format=CL)):
        with torch.inference_mode():
            fast = block(x)
        torch.testing.assert_close(fast, reference(block, x), rtol=0, atol=1e-5)
    with torch.no_grad():
        block.v_layer_5x1.weight.mul_(2)  # an in-place change re-folds the kernels
        torch.testing.assert_close(block(x), reference(block, x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 300, 40, 40), (1, 1024, 30, 30), (2, 1, 4, 4)])
def test_contiguous_nchw_equals_contiguous(shape):
    x = torch.randn(shape)
    for source in (x, x.contiguous(memory_format=CL), x[:, :, ::2]):
        out = contiguous_nchw(source)
        assert out.is_contiguous()
        assert torch.equal(out, source.contiguous())


# ------------------------------------------------------------- whole models: caches, tracing, compiling, hooks


@pytest.fixture(scope="module")
def small_models() -> dict[str, nn.Module]:
    """cls, rec (PP-OCRv4, 6 classes) and det (PP-OCRv4 mobile) with random weights and batch norms, and an input
    for each."""
    import architectures

    torch.manual_seed(12)
    configs = {"cls": architectures.family_config("ppocr_mobile_v2.0_cls"),
               "rec": architectures.family_config("PP-OCRv4_mobile_rec", head={"out_channels": 6}),
               "det": architectures.family_config("PP-OCRv4_mobile_det")}
    return {task: randomize_batch_norms(architectures.build(config), seed=i)
            for i, (task, config) in enumerate(configs.items())}


INPUTS = {"cls": (1, 3, 48, 96), "rec": (2, 3, 48, 64), "det": (1, 3, 64, 96)}


def test_inference_caches_follow_data_edits_on_request_and_mode_transitions(small_models):
    """``.data`` edits bypass torch's version counters: the model's clear_inference_cache() and train()/eval()
    transitions drop the folded (and packed) weights of its layers, as do .to() round trips."""
    model = copy.deepcopy(small_models["rec"])
    conv_bn = model.backbone.conv1  # a ConvBNLayer
    rep = model.backbone.blocks2[0].dw_conv  # a LearnableRepLayer (deploy form)
    probes = [(conv_bn, torch.rand(2, 3, 12, 16)), (rep, torch.rand(2, rep.in_channels, 6, 8))]

    def fast():
        with torch.inference_mode():
            return [layer(x) for layer, x in probes]

    def check():
        for got, (layer, x) in zip(fast(), probes):
            torch.testing.assert_close(got, reference(layer, x), rtol=0, atol=1e-5)

    edits = [lambda: conv_bn.conv.weight.data.mul_(0.5), lambda: conv_bn.bn.running_var.data.fill_(4.0),
             lambda: rep.reparam_conv.weight.data.mul_(0.5), lambda: rep.lab.scale.data.fill_(2.0)]
    for edit in edits:
        before = fast()
        edit()
        model.clear_inference_cache()
        assert any(not torch.allclose(a, b, atol=1e-3) for a, b in zip(fast(), before))
        check()
    for edit, refresh in ((lambda: conv_bn.bn.running_mean.data.add_(1.0), lambda: model.train().eval()),
                          (lambda: rep.lab.bias.data.add_(1.0), lambda: model.eval().train().eval()),
                          (lambda: None, lambda: model.half().float())):  # new storages may reuse old addresses
        fast()
        edit()
        refresh()
        check()


@pytest.mark.parametrize("task", ["cls", "rec", "det"])
def test_trace_under_no_grad_equals_eager(small_models, task):
    model = small_models[task]
    x = torch.rand(*INPUTS[task])
    with torch.no_grad():
        traced = torch.jit.trace(model, x)
    other = torch.rand(*INPUTS[task])
    with torch.inference_mode():
        torch.testing.assert_close(traced(other), model(other), rtol=0, atol=1e-5)


def test_compile_under_inference_mode_equals_eager(small_models):
    model = small_models["cls"]
    x = torch.rand(*INPUTS["cls"])
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=1e-5)
    torch._dynamo.reset()


def test_forward_hooks_fire_and_see_tensors_that_are_not_modified_later(small_models):
    """Hooks on modules the fast path would skip (a folded convolution) or whose output it would update in place
    (the FPN laterals) switch those modules to their plain computation; without hooks the fast path is back."""
    model = small_models["det"]
    x = torch.rand(*INPUTS["det"])
    with torch.inference_mode():
        expected = model(x)
    calls, captured = [], {}
    handles = [model.backbone.conv1.conv.register_forward_hook(lambda module, args, out: calls.append("conv1")),
               model.neck.ins_conv[0].register_forward_hook(
                   lambda module, args, out: captured.update(ins0=(out, out.clone())))]
    try:
        for context in (torch.inference_mode, torch.no_grad, torch.enable_grad):
            calls.clear()
            with context():
                torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)
            assert calls == ["conv1"]
            seen, copy_at_the_time = captured.pop("ins0")
            assert torch.equal(seen, copy_at_the_time)
    finally:
        for handle in handles:
            handle.remove()
    global_calls = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: global_calls.append(module) if module is model.head.binarize.conv1 else None)
    try:
        with torch.inference_mode():
            torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)
        assert global_calls == [model.head.binarize.conv1]
    finally:
        handle.remove()
    model.clear_inference_cache()
    with torch.inference_mode():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    assert model.backbone.conv1._folded._entry is not None  # the fast path ran again


@pytest.mark.parametrize("shape", [(1, 3, 100, 128), (1, 3, 96, 137), (2, 3, 48, 40)])
def test_det_inputs_must_have_sides_that_are_multiples_of_32(small_models, shape):
    x = torch.rand(*shape)
    for context in (torch.inference_mode, torch.enable_grad):
        with context(), pytest.raises(ValueError, match=r"input height and width must be multiples of 32 .*got "
                                                        rf"input shape {re.escape(str(shape))}"):
            small_models["det"](x)
