"""Architecture configs of the pre-v4 families (hyper-parameters from PaddleOCR's release configs).

Recognition / classification class counts are placeholders that the converter replaces by the count
read from the checkpoint's head (``out_channels`` / ``class_dim``).
"""
from __future__ import annotations

DET_PREPROCESS = {"resize_long": 960, "limit_type": "max", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
            "scale": 1.0 / 255, "channel_order": "BGR"}
DB_POSTPROCESS = {"name": "DBPostProcess", "thresh": 0.3, "box_thresh": 0.6, "max_candidates": 1000, "unclip_ratio": 1.5}
CTC_POSTPROCESS = {"name": "CTCLabelDecode"}


def rec_preprocess(height: int) -> dict:
    return {"image_shape": [3, height, 320], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "scale": 1.0 / 255,
            "channel_order": "BGR"}


def det_family(backbone: dict, neck: dict, head: dict) -> dict:
    """A detection family config with PaddleOCR's DB pre- and post-processing."""
    return {"task": "det", "backbone": backbone, "neck": neck, "head": head,
            "preprocess": dict(DET_PREPROCESS), "postprocess": dict(DB_POSTPROCESS)}


def rec_family(backbone: dict, neck: dict | None, head: dict, height: int) -> dict:
    """A CTC recognition family config for input ``height`` (32 for CRNN-era models, 48 for SVTR-era ones)."""
    return {"task": "rec", "backbone": backbone, "neck": neck, "head": head,
            "preprocess": rec_preprocess(height), "postprocess": dict(CTC_POSTPROCESS)}


def _mv3_large_det() -> dict:
    return {"name": "DetMobileNetV3", "model_name": "large", "scale": 0.5, "disable_se": True}


def _db_head() -> dict:
    return {"name": "DBHead", "k": 50}


def _rnn_neck(hidden_size: int) -> dict:
    return {"name": "SequenceEncoder", "encoder_type": "rnn", "hidden_size": hidden_size}


FAMILIES: dict[str, dict] = {
    "ppocr_mobile_v2.0_det": det_family(_mv3_large_det(), {"name": "DBFPN", "out_channels": 96}, _db_head()),
    "ppocr_server_v2.0_det": det_family({"name": "DetResNet_vd", "layers": 18},
                                        {"name": "DBFPN", "out_channels": 256}, _db_head()),
    # Same network as ppocr_mobile_v2.0_det; only the checkpoint layout (CML distillation) differs.
    "PP-OCRv2_det": det_family(_mv3_large_det(), {"name": "DBFPN", "out_channels": 96}, _db_head()),
    "PP-OCRv3_det": det_family(_mv3_large_det(), {"name": "RSEFPN", "out_channels": 96, "shortcut": True},
                               _db_head()),
    "ppocr_mobile_v2.0_rec": rec_family(
        {"name": "RecMobileNetV3", "model_name": "small", "scale": 0.5, "small_stride": [1, 2, 2, 2]},
        _rnn_neck(48), {"name": "CTCHead", "out_channels": 6625}, height=32),
    "ppocr_server_v2.0_rec": rec_family({"name": "RecResNet_vd", "layers": 34}, _rnn_neck(256),
                                        {"name": "CTCHead", "out_channels": 6625}, height=32),
    "PP-OCRv2_rec": rec_family({"name": "MobileNetV1Enhance", "scale": 0.5}, _rnn_neck(64),
                               {"name": "CTCHead", "out_channels": 6625, "mid_channels": 96}, height=32),
    "PP-OCRv3_rec": rec_family(
        {"name": "MobileNetV1Enhance", "scale": 0.5, "last_conv_stride": [1, 2], "last_pool_type": "avg"},
        None,
        {"name": "MultiHead", "out_channels": 6625,
         "ctc_neck": {"encoder_type": "svtr", "dims": 64, "depth": 2, "hidden_dims": 120, "use_guide": True,
                      "kernel_size": [3, 3]},
         "ctc_head": {}},
        height=48),
    "ppocr_mobile_v2.0_cls": {
        "task": "cls",
        "backbone": {"name": "RecMobileNetV3", "model_name": "small", "scale": 0.35},
        "neck": None,
        "head": {"name": "ClsHead", "class_dim": 2},
        "preprocess": {"image_shape": [3, 48, 192], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                       "scale": 1.0 / 255, "channel_order": "BGR"},
        "postprocess": {"name": "ClsPostProcess", "label_list": ["0", "180"], "thresh": 0.9},
    },
}
