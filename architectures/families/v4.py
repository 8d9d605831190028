"""Architecture configs of the PP-OCRv4 families (hyper-parameters from PaddleOCR's PP-OCRv4 configs:
ch_PP-OCRv4_det_student.yml, ch_PP-OCRv4_det_teacher.yml, ch_PP-OCRv4_rec.yml, ch_PP-OCRv4_rec_hgnet.yml).

Recognition class counts are placeholders that the converter replaces by the count read from the checkpoint.
The NRTR branch of the rec MultiHead (``gtc_head`` / ``before_gtc``) only trains; it is not built.
"""
from __future__ import annotations

from architectures.families.classic import det_family, rec_family

_V4_CTC_NECK = {"encoder_type": "svtr", "dims": 120, "depth": 2, "hidden_dims": 120, "use_guide": True,
                "kernel_size": [1, 3]}



def _v4_rec_head() -> dict:
    return {"name": "MultiHead", "out_channels": 6625, "ctc_neck": dict(_V4_CTC_NECK), "ctc_head": {}}


FAMILIES: dict[str, dict] = {
    "PP-OCRv4_mobile_det": det_family({"name": "PPLCNetV3", "scale": 0.75, "det": True},
                                      {"name": "RSEFPN", "out_channels": 96, "shortcut": True},
                                      {"name": "DBHead", "k": 50}),
    "PP-OCRv4_server_det": det_family({"name": "PPHGNet_small", "det": True},
                                      {"name": "LKPAN", "out_channels": 256, "intracl": True},
                                      {"name": "PFHeadLocal", "k": 50, "mode": "large"}),
    "PP-OCRv4_mobile_rec": rec_family({"name": "PPLCNetV3", "scale": 0.95}, None, _v4_rec_head(), height=48),
    "PP-OCRv4_server_rec": rec_family({"name": "PPHGNet_small"}, None, _v4_rec_head(), height=48),
}
