"""architectures.build: the deploy form is built directly, and skipping random init leaves torch.nn.init intact."""
from __future__ import annotations

import pytest
import torch

import architectures


def test_deploy_form_is_built_without_training_branches():
    model = architectures.build(architectures.family_config("PP-OCRv4_mobile_rec"))
    names = [name for name, _ in model.named_modules()]
    assert any(name.endswith("reparam_conv") for name in names)
    assert not any(".conv_kxk" in name or name.endswith("conv_1x1") for name in names)


def test_train_form_keeps_the_branches():
    model = architectures.build(architectures.family_config("PP-OCRv4_mobile_det", form="train"))
    names = [name for name, _ in model.named_modules()]
    assert any(".conv_kxk.0" in name for name in names)
    assert not any(name.endswith("reparam_conv") for name in names)


def test_skipping_init_restores_torch_init_functions_even_on_error():
    original = torch.nn.init.kaiming_uniform_
    with pytest.raises(ValueError, match="unknown backbone 'NoSuchBackbone'"):
        architectures.build({"backbone": {"name": "NoSuchBackbone"}}, init_weights=False)
    assert torch.nn.init.kaiming_uniform_ is original
    model = architectures.build(architectures.family_config("ppocr_mobile_v2.0_cls"), init_weights=False)
    assert torch.nn.init.kaiming_uniform_ is original
    # with init: a fresh conv weight is random, not left as allocated
    reference = architectures.build(architectures.family_config("ppocr_mobile_v2.0_cls"))
    assert float(reference.backbone.conv1.conv.weight.detach().std()) > 0
    assert set(model.state_dict()) == set(reference.state_dict())


def test_unknown_form_is_refused():
    with pytest.raises(ValueError, match="form must be"):
        architectures.build(architectures.family_config("ppocr_mobile_v2.0_cls", form="fused"))
