"""Architecture configs of the PP-OCRv4 families (hyper-parameters from PaddleOCR's PP-OCRv4 configs:
ch_PP-OCRv4_det_student.yml, ch_PP-OCRv4_det_teacher.yml, ch_PP-OCRv4_rec.yml, ch_PP-OCRv4_rec_hgnet.yml).

Recognition class counts are placeholders that the converter replaces by the count read from the checkpoint.
The NRTR branch of the rec MultiHead (``gtc_head`` / ``before_gtc``) only trains; it is not built.
"""
from __future__ import annotations

from architectures.families.classic import CTC_POSTPROCESS, DB_POSTPROCESS, DET_PREPROCESS, rec_preprocess

_V4_CTC_NECK = {"encoder_type": "svtr", "dims": 120, "depth": 2, "hidden_dims": 120, "use_guide": True,
                "kernel_size": [1, 3]}

FAMILIES: dict[str, dict] = {
    "PP-OCRv4_mobile_det": {
        "task": "det",
        "backbone": {"name": "PPLCNetV3", "scale": 0.75, "det": True},
        "neck": {"name": "RSEFPN", "out_channels": 96, "shortcut": True},
        "head": {"name": "DBHead", "k": 50},
        "preprocess": dict(DET_PREPROCESS),
        "postprocess": dict(DB_POSTPROCESS),
    },
    "PP-OCRv4_server_det": {
        "task": "det",
        "backbone": {"name": "PPHGNet_small", "det": True},
        "neck": {"name": "LKPAN", "out_channels": 256, "intracl": True},
        "head": {"name": "PFHeadLocal", "k": 50, "mode": "large"},
        "preprocess": dict(DET_PREPROCESS),
        "postprocess": dict(DB_POSTPROCESS),
    },
    "PP-OCRv4_mobile_rec": {
        "task": "rec",
        "backbone": {"name": "PPLCNetV3", "scale": 0.95},
        "neck": None,
        "head": {"name": "MultiHead", "out_channels": 6625, "ctc_neck": dict(_V4_CTC_NECK), "ctc_head": {}},
        "preprocess": rec_preprocess(48),
        "postprocess": dict(CTC_POSTPROCESS),
    },
    "PP-OCRv4_server_rec": {
        "task": "rec",
        "backbone": {"name": "PPHGNet_small"},
        "neck": None,
        "head": {"name": "MultiHead", "out_channels": 6625, "ctc_neck": dict(_V4_CTC_NECK), "ctc_head": {}},
        "preprocess": rec_preprocess(48),
        "postprocess": dict(CTC_POSTPROCESS),
    },
}
