"""Conversion rules of the pre-v4 families (ppocr v2.0, PP-OCRv2, PP-OCRv3, the direction classifier).

Distillation checkpoints convert their Student by default; ``submodel="Student2"`` (det) and
``submodel="Teacher"`` (every distillation family) select the other sub-models.
"""
from __future__ import annotations

from converter.rules import ClassCount, FamilyRules, OptionalBranch, merge_lstm_aliases

# Distillation checkpoints: the student is "Student." in public PaddleOCR and "student_model." in the
# released ch_PP-OCRv2_det_distill_train; "" covers plain checkpoints, student.pdparams and inference models.
_STUDENT_PREFIXES = ("Student.", "student_model.", "")

DB_THRESHOLD = OptionalBranch(name="db_threshold_branch", config_path=("head", "use_threshold"),
                              key_pattern=r"^head\.thresh\.")
CTC_CLASSES = ClassCount(config_path=("head", "out_channels"),
                         keys=("head.fc.bias", "head.fc2.bias", "head.ctc_head.fc.bias", "head.ctc_head.fc2.bias"))
CLS_CLASSES = ClassCount(config_path=("head", "class_dim"), keys=("head.fc.bias",))


def _det(family: str, alternates=(), foreign=(), submodel_configs=None) -> FamilyRules:
    return FamilyRules(family=family, prefixes=_STUDENT_PREFIXES, alternates=alternates, foreign_prefixes=foreign,
                       optional_branches=(DB_THRESHOLD,), submodel_configs=submodel_configs or {})


# CML distillation teachers (ch_PP-OCRv2_det_cml.yml / ch_PP-OCRv3_det_cml.yml): other architectures.
_V2_DET_TEACHER = {"backbone": {"name": "DetResNet_vd", "layers": 18},
                   "neck": {"name": "DBFPN", "out_channels": 256},
                   "head": {"name": "DBHead", "k": 50}}
_V3_DET_TEACHER = {"backbone": {"name": "DetResNet_vd", "layers": 50},
                   "neck": {"name": "LKPAN", "out_channels": 256, "mode": "large"},
                   "head": {"name": "DBHead", "k": 50, "kernel_list": [7, 2, 2]}}


def _rec(family: str, **extra) -> FamilyRules:
    return FamilyRules(family=family, prefixes=_STUDENT_PREFIXES, transforms=(merge_lstm_aliases,),
                       class_count=CTC_CLASSES, **extra)


RULES: dict[str, FamilyRules] = {
    "ppocr_mobile_v2.0_det": _det("ppocr_mobile_v2.0_det"),
    "ppocr_server_v2.0_det": _det("ppocr_server_v2.0_det"),
    # CML distillation: Student / Student2 share the architecture, Teacher is ResNet_vd 18 + DBFPN 256.
    # (teacher_model. is the guessed teacher counterpart of the released student_model. prefix.)
    "PP-OCRv2_det": _det("PP-OCRv2_det", alternates=("Student2.",), foreign=("teacher_model.",),
                         submodel_configs={"Teacher.": _V2_DET_TEACHER}),
    # CML distillation: Student / Student2 share the architecture, Teacher is ResNet50_vd + LKPAN.
    "PP-OCRv3_det": _det("PP-OCRv3_det", alternates=("Student2.",), submodel_configs={"Teacher.": _V3_DET_TEACHER}),
    "ppocr_mobile_v2.0_rec": _rec("ppocr_mobile_v2.0_rec"),
    "ppocr_server_v2.0_rec": _rec("ppocr_server_v2.0_rec"),
    # Distillation: the Teacher has the Student's architecture (selectable with submodel="Teacher").
    "PP-OCRv2_rec": _rec("PP-OCRv2_rec", alternates=("Teacher.",)),
    # The SAR branch of MultiHead only trains the shared backbone; the inference program has no SAR.
    "PP-OCRv3_rec": _rec("PP-OCRv3_rec", alternates=("Teacher.",),
                         drops=(("sar_head_training_only", r"^head\.sar_head\."),)),
    "ppocr_mobile_v2.0_cls": FamilyRules(family="ppocr_mobile_v2.0_cls", class_count=CLS_CLASSES),
}
