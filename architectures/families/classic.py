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


_MV3_LARGE_DET = {"name": "DetMobileNetV3", "model_name": "large", "scale": 0.5, "disable_se": True}

FAMILIES: dict[str, dict] = {
    "ppocr_mobile_v2.0_det": {
        "task": "det",
        "backbone": dict(_MV3_LARGE_DET),
        "neck": {"name": "DBFPN", "out_channels": 96},
        "head": {"name": "DBHead", "k": 50},
        "preprocess": dict(DET_PREPROCESS),
        "postprocess": dict(DB_POSTPROCESS),
    },
    "ppocr_server_v2.0_det": {
        "task": "det",
        "backbone": {"name": "DetResNet_vd", "layers": 18},
        "neck": {"name": "DBFPN", "out_channels": 256},
        "head": {"name": "DBHead", "k": 50},
        "preprocess": dict(DET_PREPROCESS),
        "postprocess": dict(DB_POSTPROCESS),
    },
    "PP-OCRv2_det": {
        "task": "det",
        "backbone": dict(_MV3_LARGE_DET),
        "neck": {"name": "DBFPN", "out_channels": 96},
        "head": {"name": "DBHead", "k": 50},
        "preprocess": dict(DET_PREPROCESS),
        "postprocess": dict(DB_POSTPROCESS),
    },
    "PP-OCRv3_det": {
        "task": "det",
        "backbone": dict(_MV3_LARGE_DET),
        "neck": {"name": "RSEFPN", "out_channels": 96, "shortcut": True},
        "head": {"name": "DBHead", "k": 50},
        "preprocess": dict(DET_PREPROCESS),
        "postprocess": dict(DB_POSTPROCESS),
    },
    "ppocr_mobile_v2.0_rec": {
        "task": "rec",
        "backbone": {"name": "RecMobileNetV3", "model_name": "small", "scale": 0.5, "small_stride": [1, 2, 2, 2]},
        "neck": {"name": "SequenceEncoder", "encoder_type": "rnn", "hidden_size": 48},
        "head": {"name": "CTCHead", "out_channels": 6625},
        "preprocess": rec_preprocess(32),
        "postprocess": dict(CTC_POSTPROCESS),
    },
    "ppocr_server_v2.0_rec": {
        "task": "rec",
        "backbone": {"name": "RecResNet_vd", "layers": 34},
        "neck": {"name": "SequenceEncoder", "encoder_type": "rnn", "hidden_size": 256},
        "head": {"name": "CTCHead", "out_channels": 6625},
        "preprocess": rec_preprocess(32),
        "postprocess": dict(CTC_POSTPROCESS),
    },
    "PP-OCRv2_rec": {
        "task": "rec",
        "backbone": {"name": "MobileNetV1Enhance", "scale": 0.5},
        "neck": {"name": "SequenceEncoder", "encoder_type": "rnn", "hidden_size": 64},
        "head": {"name": "CTCHead", "out_channels": 6625, "mid_channels": 96},
        "preprocess": rec_preprocess(32),
        "postprocess": dict(CTC_POSTPROCESS),
    },
    "PP-OCRv3_rec": {
        "task": "rec",
        "backbone": {"name": "MobileNetV1Enhance", "scale": 0.5, "last_conv_stride": [1, 2],
                     "last_pool_type": "avg"},
        "neck": None,
        "head": {"name": "MultiHead", "out_channels": 6625,
                 "ctc_neck": {"encoder_type": "svtr", "dims": 64, "depth": 2, "hidden_dims": 120,
                              "use_guide": True, "kernel_size": [3, 3]},
                 "ctc_head": {}},
        "preprocess": rec_preprocess(48),
        "postprocess": dict(CTC_POSTPROCESS),
    },
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
