"""A trained checkpoint's own weights in the released inference program (converter.substitute,
paddle_io.rewrite_params) and the parity verdicts of trained conversions built on it.

A trained checkpoint whose weights differ from the release (another epoch, another sub-model) used to be compared
with the released program as shipped, and the inevitable failure was excused as "information": a wrong trained-only
mapping passed. Now Paddle's program runs with the checkpoint's weights, found by Paddle's names alone.
"""
from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import fixture_data
from converter import convert as pipeline, paddle_io, parity, rules, substitute
from converter.cli import main
from converter.errors import FamilyError, OutputError
from converter.manifest import get_model

CLS = "ch_ppocr_mobile_v2.0_cls"
CLS_FAMILY = "ppocr_mobile_v2.0_cls"
HAVE_PADDLE = parity.paddle_available()


def _family(row: str) -> str:
    return get_model(row).family


def _perturbed_checkpoint(row: str, path: Path, scale: float = 0.05, seed: int = 0, dtype: str = "float32") -> Path:
    """The row's trained checkpoint with every conv / linear weight changed by ~``scale`` (another "epoch"),
    its float32 arrays stored as ``dtype``."""
    rng = np.random.RandomState(seed)
    arrays = {key: np.array(value) for key, value in paddle_io.load(fixture_data.train_tar(row)).items()}
    for key, array in arrays.items():
        if array.dtype == np.float32 and array.ndim >= 2:
            array = (array * (1 + scale * rng.standard_normal(array.shape))).astype(np.float32)
        arrays[key] = array.astype(dtype) if array.dtype == np.float32 else array
    with open(path, "wb") as f:
        pickle.dump({**arrays, "StructuredToParameterName@@": {k: k for k in arrays}}, f, protocol=4)
    return path


# ---------------------------------------------------------------------------------------------------- unit

@pytest.mark.parametrize("row", fixture_data.all_rows())
def test_every_fixture_checkpoint_gives_every_program_parameter(row):
    """Each row's trained checkpoint (its converted sub-model) gives every parameter of its inference program:
    the very arrays the export wrote, or PPLCNetV3's fused convolutions within float32 rounding."""
    trained, inference = paddle_io.load(fixture_data.train_tar(row)), paddle_io.load(fixture_data.infer_tar(row))
    submodel = rules.convert(trained, _family(row)).submodel
    plan = substitute.checkpoint_in_program(trained, inference, _family(row), submodel)
    assert plan.complete and plan.unresolved == []
    assert len(plan.values) == len(inference.program.params)
    by_var = {var: name for name, var in inference.param_names.items()}
    for var, value in plan.values.items():
        released = inference[by_var[var]]
        if ".reparam_conv." in by_var[var]:
            np.testing.assert_allclose(value, released, rtol=0, atol=2e-6)
        else:
            assert np.array_equal(value, released), by_var[var]
    assert (plan.derived > 0) == _family(row).startswith("PP-OCRv4_mobile")


def test_distillation_submodel_is_taken_by_its_prefix():
    row = "ch_PP-OCRv3_det"  # CML: Student, Student2 and Teacher
    trained, inference = paddle_io.load(fixture_data.train_tar(row)), paddle_io.load(fixture_data.infer_tar(row))
    student = substitute.checkpoint_in_program(trained, inference, _family(row), "Student.")
    student2 = substitute.checkpoint_in_program(trained, inference, _family(row), "Student2.")
    assert student.complete and student2.complete and student2.summary()["submodel"] == "Student2"
    some = next(iter(student.values))
    assert not np.array_equal(student.values[some], student2.values[some])
    teacher = substitute.checkpoint_in_program(trained, inference, _family(row), "Teacher.")  # ResNet50_vd
    assert not teacher.complete and teacher.unresolved


def test_missing_and_wrongly_shaped_parameters_are_listed():
    trained, inference = paddle_io.load(fixture_data.train_tar(CLS)), paddle_io.load(fixture_data.infer_tar(CLS))
    damaged = dict(trained)
    del damaged["head.fc.bias"]
    damaged["head.fc.weight"] = damaged["head.fc.weight"][:, :1]
    plan = substitute.checkpoint_in_program(damaged, inference, CLS_FAMILY)
    assert not plan.complete and plan.summary()["unresolved_count"] == 2
    assert any(u.startswith("head.fc.bias [2]: no head.fc.bias in the checkpoint") for u in plan.unresolved)
    assert any("head.fc.weight" in u and "the checkpoint has [" in u for u in plan.unresolved)
    other_row = paddle_io.load(fixture_data.train_tar("en_number_mobile_v2.0_rec"))  # 97 classes, not 6625
    chinese = paddle_io.load(fixture_data.infer_tar("ch_ppocr_mobile_v2.0_rec"))
    rec = substitute.checkpoint_in_program(other_row, chinese, "ppocr_mobile_v2.0_rec")
    assert not rec.complete and all(u.startswith("head.fc.") for u in rec.unresolved)


def test_real_release_spelling_and_fused_convolutions_are_found(real_models):
    """The real PP-OCRv4 programs name the LearnableAffineBlocks as the release code did (``<p>.w``); a trained
    checkpoint uses the public names and holds the unfused branches."""
    for row, folder, family in (("ch_PP-OCRv4_det", "ch_PP-OCRv4_det_infer", "PP-OCRv4_mobile_det"),
                                ("ch_PP-OCRv4_rec", "ch_PP-OCRv4_rec_infer", "PP-OCRv4_mobile_rec")):
        trained = paddle_io.load(fixture_data.train_tar(row))
        plan = substitute.checkpoint_in_program(trained, paddle_io.load(real_models / folder), family)
        assert plan.complete and plan.release_spelling > 100 and plan.derived == 56, plan.summary()


def test_rewritten_parameters_file_is_the_original_with_the_new_data(tmp_path):
    inference = paddle_io.load(fixture_data.infer_tar(CLS))
    prefix = pipeline.program_prefix(fixture_data.infer_tar(CLS), tmp_path)
    original = prefix.with_suffix(".pdiparams")
    same = tmp_path / "same.pdiparams"
    by_name = {var: inference[name] for name, var in inference.param_names.items()}
    paddle_io.rewrite_params(original, inference.program, by_name, same)
    assert same.read_bytes() == original.read_bytes()

    var = inference.param_names["head.fc.weight"]
    new_value = np.arange(by_name[var].size, dtype=np.float32).reshape(by_name[var].shape)
    changed = tmp_path / "changed" / "inference"
    changed.parent.mkdir()
    for suffix in (".pdmodel", ".pdiparams.info"):
        changed.with_suffix(suffix).write_bytes(prefix.with_suffix(suffix).read_bytes())
    paddle_io.rewrite_params(original, inference.program, {var: new_value}, changed.with_suffix(".pdiparams"))
    reread = paddle_io.load(changed)
    assert np.array_equal(reread["head.fc.weight"], new_value)
    assert all(np.array_equal(reread[k], inference[k]) for k in inference if k != "head.fc.weight")

    with pytest.raises(ValueError, match=r"the replacement is \[2, 2\] float32"):
        paddle_io.rewrite_params(original, inference.program, {var: np.zeros((2, 2), np.float32)}, tmp_path / "x")
    with pytest.raises(ValueError, match="not parameters of the program: nope"):
        paddle_io.rewrite_params(original, inference.program, {"nope": new_value}, tmp_path / "y")


def test_a_failure_is_excused_only_when_the_released_weights_ran():
    failed = {"passed": False, "max_abs_diff": 0.3, "weights_vs_inference": {"identical": False}}
    assert pipeline.parity_failure({**failed, "reference_weights": {"substituted": False}}) is None
    assert pipeline.parity_failure({**failed, "reference_weights": {"substituted": True}})
    assert pipeline.parity_failure({**failed, "weights_vs_inference": {"identical": True},
                                    "reference_weights": {"substituted": False}})
    # a record written before substitution existed: a batch converts and checks it again
    assert pipeline.parity_failure(failed)


def test_float16_and_float64_checkpoints_are_put_in_as_the_program_s_float32(tmp_path):
    trained, inference = paddle_io.load(fixture_data.train_tar(CLS)), paddle_io.load(fixture_data.infer_tar(CLS))
    by_var = {var: name for name, var in inference.param_names.items()}
    for dtype in (np.float16, np.float64):
        cast = {key: value.astype(dtype) if value.dtype == np.float32 else value for key, value in trained.items()}
        plan = substitute.checkpoint_in_program(cast, inference, CLS_FAMILY)
        assert plan.complete
        assert all(v.dtype == np.float32 and np.array_equal(v, cast[by_var[var]].astype(np.float32))
                   for var, v in plan.values.items())


# ------------------------------------------------------------------------------------------- with Paddle

@pytest.mark.paddle
def test_checkpoint_of_another_epoch_is_verified_in_the_released_program(tmp_path):
    checkpoint = _perturbed_checkpoint(CLS, tmp_path / "best_accuracy.pdparams")
    result = pipeline.convert(checkpoint, out=tmp_path / "out", family=CLS_FAMILY,
                              reference=fixture_data.infer_tar(CLS))
    data = json.loads((result.out / "parity.json").read_text())
    assert not data["weights_vs_inference"]["identical"]  # the release is another "epoch"
    assert data["reference_weights"]["substituted"] and data["reference_weights"]["checkpoint"] == str(checkpoint)
    assert data["passed"] and data["max_abs_diff"] <= 1e-5 and "verdict" not in data
    assert result.status == "converted"
    notes = list(pipeline.iter_notes(result))
    assert any(n.startswith("reference weights: the trained checkpoint's weights, put into") for n in notes)

    report = pipeline.check(result.out, reference=fixture_data.infer_tar(CLS))  # `ocrconv check DIR` redoes it
    assert report.passed and report.data["reference_weights"]["substituted"]


@pytest.mark.paddle
@pytest.mark.parametrize("dtype", ["float32", "float16", "float64"])
def test_a_wrong_trained_mapping_fails_although_the_weights_differ_from_the_release(tmp_path, monkeypatch, dtype):
    """The review's case: a mapping bug on a trained checkpoint whose weights are not the release's was excused
    ("information, not a conversion failure") and exited 0; also when the checkpoint is stored in float16 or
    float64 (their arrays were first taken for missing parameters)."""
    def wrong_bn_scale(state, ctx):
        state["backbone.conv1.bn.weight"] = state["backbone.conv1.bn.weight"] * 1.5
        return state

    broken = dataclasses.replace(rules.RULES[CLS_FAMILY], transforms=(wrong_bn_scale,))
    monkeypatch.setitem(rules.RULES, CLS_FAMILY, broken)
    checkpoint = _perturbed_checkpoint(CLS, tmp_path / "best_accuracy.pdparams", dtype=dtype)
    result = pipeline.convert(checkpoint, out=tmp_path / "out", family=CLS_FAMILY,
                              reference=fixture_data.infer_tar(CLS))
    data = json.loads((result.out / "parity.json").read_text())
    assert data["reference_weights"]["substituted"] and not data["passed"]
    assert result.status == "parity-failed" and "beyond the tolerance" in pipeline.parity_failure(data)


@pytest.mark.paddle
def test_check_dir_finds_the_recorded_checkpoint_from_any_working_directory(tmp_path, monkeypatch):
    """The checkpoint path was recorded as given (relative): `check DIR` from elsewhere lost it, or read another
    best_accuracy.pdparams of the current directory."""
    (tmp_path / "model").mkdir()
    monkeypatch.chdir(tmp_path / "model")
    _perturbed_checkpoint(CLS, Path("best_accuracy.pdparams"))
    pipeline.convert("best_accuracy.pdparams", out=tmp_path / "out", family=CLS_FAMILY,
                     reference=fixture_data.infer_tar(CLS))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    _perturbed_checkpoint(CLS, Path("best_accuracy.pdparams"), seed=1)  # another file of that name here
    report = pipeline.check(tmp_path / "out", reference=fixture_data.infer_tar(CLS))
    assert report.passed and report.data["reference_weights"]["substituted"]


@pytest.mark.paddle
def test_check_dir_without_the_checkpoint_says_not_verified_instead_of_failing(tmp_path):
    """The checkpoint of a trained output moved away: `check` compared the released weights, exited 1 and
    rewrote a good parity.json as a plain failure."""
    checkpoint = _perturbed_checkpoint(CLS, tmp_path / "best_accuracy.pdparams")
    out = tmp_path / "out"
    pipeline.convert(checkpoint, out=out, family=CLS_FAMILY, reference=fixture_data.infer_tar(CLS))
    checkpoint.rename(tmp_path / "moved.pdparams")
    res = CliRunner().invoke(main, ["check", str(out), "--reference", str(fixture_data.infer_tar(CLS))])
    assert res.exit_code == 0, res.output
    assert "verdict: not verified" in res.output and "is not available unchanged" in res.output
    data = json.loads((out / "parity.json").read_text())
    assert not data["passed"] and not data["weights_vs_inference"]["identical"]
    assert pipeline.parity_failure(data) is None and data["verdict"].startswith("not verified")


@pytest.mark.paddle
def test_without_every_program_parameter_the_released_weights_run_and_say_so(tmp_path):
    """A trained checkpoint converted to a sub-model of another architecture (the CML Teacher) cannot run in the
    Student's program: the released weights run, and the report says why."""
    row = "ch_PP-OCRv3_det"
    trained = paddle_io.load(fixture_data.train_tar(row))
    conversion = rules.convert(trained, _family(row), submodel="Teacher")
    prefix = pipeline.program_prefix(fixture_data.infer_tar(row), tmp_path)
    report = pipeline.compare_with_program(conversion.model, pipeline.usage_facts(conversion.config), prefix,
                                           paddle_io.load(fixture_data.infer_tar(row)), trained, _family(row),
                                           conversion.submodel, tmp_path)
    weights = report.data["reference_weights"]
    assert not weights["substituted"] and weights["submodel"] == "Teacher" and weights["unresolved_count"] > 0
    assert "released" in parity.reference_weights_line(report.data)
    assert not any(tmp_path.glob("checkpoint-*"))


@pytest.mark.paddle
@pytest.mark.real
@pytest.mark.slow
def test_fixture_checkpoint_in_the_real_v4_programs_passes(real_models, tmp_path):
    """The real-world case: a trained PP-OCRv4 checkpoint (public names, unfused branches) that is not the epoch
    of the release, checked in the real release program (release names, fused convolutions)."""
    for row, folder in (("ch_PP-OCRv4_det", "ch_PP-OCRv4_det_infer"), ("ch_PP-OCRv4_rec", "ch_PP-OCRv4_rec_infer")):
        result = pipeline.convert(fixture_data.train_tar(row), out=tmp_path / row, reference=real_models / folder)
        data = result.parity
        assert data["reference_weights"]["substituted"], data["reference_weights"]
        assert not data["weights_vs_inference"]["identical"]
        assert data["passed"] and result.status == "converted", parity.ParityReport(data).table()


# ------------------------------------------------------------------------------------ choosing a sub-model

V3_DET = "ch_PP-OCRv3_det"  # CML checkpoint: Student, Student2 (same architecture) and Teacher (ResNet50_vd)


@pytest.mark.paddle
def test_submodel_option_converts_student2_and_verifies_it_in_the_released_program(tmp_path):
    out = tmp_path / "student2"
    res = CliRunner().invoke(main, ["convert", str(fixture_data.train_tar(V3_DET)), "--out", str(out),
                                    "--submodel", "Student2", "--reference", str(fixture_data.infer_tar(V3_DET))])
    assert res.exit_code == 0, res.output
    assert pipeline.read_output_metadata(out)["submodel"] == "Student2"
    data = json.loads((out / "parity.json").read_text())
    assert data["passed"] and data["reference_weights"]["substituted"]
    assert data["reference_weights"]["submodel"] == "Student2"
    assert not data["weights_vs_inference"]["identical"]  # the fixture's release is the Student
    assert data["release_submodels"] == {"Student": True, "Student2": False, "Teacher": False}
    assert ("the released inference model holds this checkpoint's Student weights, not those of the converted "
            "Student2: convert with --submodel Student") in res.output

    report = pipeline.check(out, reference=fixture_data.infer_tar(V3_DET))  # the recorded sub-model again
    assert report.passed and report.data["reference_weights"]["submodel"] == "Student2"


@pytest.mark.paddle
def test_default_conversion_says_the_release_holds_the_converted_student(tmp_path):
    result = pipeline.convert(fixture_data.train_tar(V3_DET), out=tmp_path / "s",
                              reference=fixture_data.infer_tar(V3_DET))
    assert result.parity["release_submodels"]["Student"]
    assert "the released inference model holds this checkpoint's Student weights (the sub-model converted)" \
        in result.notes


def test_submodel_names_are_matched_without_case_and_plain_keys_must_exist():
    trained = paddle_io.load(fixture_data.train_tar(V3_DET))
    assert rules.select_submodel(trained, "PP-OCRv3_det", "student2") == "Student2."
    with pytest.raises(FamilyError, match=r"no un-prefixed keys, only sub-models \['Student', 'Student2', "
                                          r"'Teacher'\]"):
        rules.select_submodel(trained, "PP-OCRv3_det", "")
    with pytest.raises(FamilyError, match=r"'Pupil' cannot be converted \(not a sub-model of this family\)"):
        rules.select_submodel(trained, "PP-OCRv3_det", "Pupil")


def test_submodel_option_errors(tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["convert", str(fixture_data.train_tar(V3_DET)), "--out", str(tmp_path / "x"),
                               "--submodel", "Student3", "--no-check"])
    assert res.exit_code != 0 and "sub-model 'Student3' cannot be converted" in res.output
    assert "Student2" in res.output and not (tmp_path / "x").exists()
    res = runner.invoke(main, ["convert", "--all", "--submodel", "Student2", "--no-check"])
    assert res.exit_code == 2 and "--submodel apply to a single NAME|PATH" in res.output
    res = runner.invoke(main, ["convert", str(fixture_data.infer_tar(V3_DET)), "--out", str(tmp_path / "y"),
                               "--submodel", "Student2", "--no-check"])
    assert res.exit_code != 0 and "this is an inference model (one exported sub-model)" in res.output


def test_an_output_of_another_submodel_is_not_up_to_date(tmp_path):
    out = tmp_path / "out"
    pipeline.convert(fixture_data.train_tar(V3_DET), out=out, submodel="Student2", check=False)
    with pytest.raises(OutputError, match=r"exists with another sub-model Student2 \(this run: Student\)"):
        pipeline.convert(fixture_data.train_tar(V3_DET), out=out, check=False, skip_up_to_date=True)
    same = pipeline.convert(fixture_data.train_tar(V3_DET), out=out, submodel="Student2", check=False,
                            skip_up_to_date=True)
    assert same.status == "up-to-date"
