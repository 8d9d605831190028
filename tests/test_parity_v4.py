"""PP-OCRv4 conversion against PaddleOCR's own outputs (fixtures) and programs (Paddle).

Tolerance (physics, measured): the fixture models have random weights with data-calibrated BN statistics, and
their float32 round-off is far above 1e-5. Paddle's own float32 outputs differ from the exact (float64) result of
the same network by up to 2.6e-5 (mobile det), 1.5e-4 (mobile rec), 1.8e-4 (server det), 1.1e-4 (server rec);
Paddle's own unfused vs fused PPLCNetV3 outputs differ by up to 7.4e-5 (fixtures README). So each comparison
measures the converted model's own float32 round-off on the same input, ``floor = max|float32 - float64|``, and
requires ``max|diff| <= max(1e-5, FLOOR_MARGIN * floor)``; the floor itself is bounded by MAX_FLOOR (a wrong port
would show up as a diff far above its floor, and a broken model as a huge floor).
"""
from __future__ import annotations

import copy
import re
import tarfile

import numpy as np
import pytest
import torch

import fixture_data as fd
from converter import paddle_io
from converter.errors import FamilyError, KeyMismatchError
from converter.rules import convert, detect_family

ISSUE_ATOL = 1e-5
FLOOR_MARGIN = 4.0
MAX_FLOOR = 1e-3

ROWS = {  # fixture row -> family
    "ch_PP-OCRv4_det": "PP-OCRv4_mobile_det",
    "ch_PP-OCRv4_rec": "PP-OCRv4_mobile_rec",
    "en_PP-OCRv4_rec": "PP-OCRv4_mobile_rec",
}
SERVER_ROWS = {
    "ch_PP-OCRv4_server_det": "PP-OCRv4_server_det",
    "ch_PP-OCRv4_server_rec": "PP-OCRv4_server_rec",
}
ALL_ROWS = {**ROWS, **SERVER_ROWS}
LCNET_ROWS = list(ROWS)


def shipped_infer_tar(row: str):
    """Inference tar shipped in the shared folder (full and hybrid rows): no Paddle needed."""
    return fd.FIXTURES / row / f"{fd.row_info(row)['infer_dirname']}.tar"


def outputs(model: torch.nn.Module, x: np.ndarray, dtype=torch.float32) -> list[np.ndarray]:
    """The model's outputs in Paddle's fetch order, computed in ``dtype`` (float64 on a copy)."""
    if dtype is not torch.float32:
        model = copy.deepcopy(model).to(dtype)
    with torch.inference_mode():
        out = model(torch.from_numpy(x).to(dtype))
    return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]


def check_against(model: torch.nn.Module, x: np.ndarray, expected: list[np.ndarray], what: str) -> list[float]:
    """Assert the physics tolerance for every output; returns the max |diff| per output."""
    ours = outputs(model, x)
    exact = outputs(model, x, torch.float64)
    diffs = []
    assert len(ours) == len(expected), f"{what}: {len(ours)} outputs, Paddle has {len(expected)}"
    for i, (a, b, e) in enumerate(zip(ours, exact, expected)):
        assert a.shape == e.shape, f"{what} output {i}: shape {a.shape} vs Paddle {e.shape}"
        floor = float(np.abs(a.astype(np.float64) - b).max())
        diff = float(np.abs(a.astype(np.float64) - e).max())
        limit = max(ISSUE_ATOL, FLOOR_MARGIN * floor)
        assert floor <= MAX_FLOOR, f"{what} output {i}: float32 round-off {floor:.3g} is implausibly large"
        assert diff <= limit, f"{what} output {i}: max|diff| {diff:.3g} > {limit:.3g} (float32 floor {floor:.3g})"
        diffs.append(diff)
    return diffs


def expected_cases(row: str) -> list[tuple[str, np.ndarray, list[np.ndarray]]]:
    e = fd.expected(row)
    cases = []
    for x, y in (("x0", "y0"), ("x1", "y1")):
        extra = sorted((k for k in e if k.startswith(y + "_")), key=lambda k: int(k.rsplit("_", 1)[1]))
        cases.append((x, e[x], [e[y]] + [e[k] for k in extra]))
    return cases


@pytest.fixture(scope="module")
def conversions():
    """Cache: (path, family, form) -> Conversion."""
    cache = {}

    def get(path, family, form="deploy"):
        key = (str(path), family, form)
        if key not in cache:
            cache[key] = convert(paddle_io.load(path), family, form=form)
        return cache[key]

    return get


# ---------------------------------------------------------------------------- fixtures, no Paddle needed


@pytest.mark.parametrize("row", LCNET_ROWS)
def test_inference_artifact_matches_paddle_outputs(conversions, row):
    conversion = conversions(shipped_infer_tar(row), ROWS[row])
    assert conversion.config["form"] == "deploy"
    assert conversion.dropped == []
    assert not any(".conv_kxk." in k for k in conversion.state_dict)
    for name, x, expected in expected_cases(row):
        check_against(conversion.model, x, expected, f"{row} inference {name}")


@pytest.mark.parametrize("form", ["deploy", "train"])
@pytest.mark.parametrize("row", LCNET_ROWS)
def test_trained_artifact_matches_paddle_outputs_fused_and_unfused(conversions, row, form):
    conversion = conversions(fd.train_tar(row), ROWS[row], form)
    assert conversion.config["form"] == form
    fused_keys = [k for k in conversion.state_dict if ".reparam_conv." in k]
    branch_keys = [k for k in conversion.state_dict if ".conv_kxk." in k]
    assert (bool(fused_keys), bool(branch_keys)) == ((True, False) if form == "deploy" else (False, True))
    for name, x, expected in expected_cases(row):
        check_against(conversion.model, x, expected, f"{row} trained {form} {name}")


@pytest.mark.parametrize("row", LCNET_ROWS)
def test_inference_model_cannot_be_unfused(row):
    weights = paddle_io.load(shipped_infer_tar(row))
    with pytest.raises(FamilyError, match=r"cannot convert to the training form.*cannot be split back"):
        convert(weights, ROWS[row], form="train")


@pytest.mark.parametrize("row", LCNET_ROWS)
def test_fusing_the_trained_checkpoint_reproduces_the_inference_reparam_conv(conversions, row):
    """The module's own reparameterize() on the training form == PaddleOCR's rep() at export, <= 1e-6 relative."""
    trained = conversions(fd.train_tar(row), ROWS[row], "train").model
    fused = copy.deepcopy(trained)
    fused.reparameterize()
    inference = paddle_io.load(shipped_infer_tar(row))
    fused_sd = fused.state_dict()
    layers = sorted({k.rsplit(".reparam_conv.", 1)[0] for k in inference if ".reparam_conv." in k})
    assert len(layers) == sum(1 for k in fused_sd if k.endswith(".reparam_conv.weight")) > 20
    for layer in layers:
        for leaf in ("weight", "bias"):
            ref = inference[f"{layer}.reparam_conv.{leaf}"].astype(np.float64)
            ours = fused_sd[f"{layer}.reparam_conv.{leaf}"].double().numpy()
            assert ours.shape == ref.shape
            rel = np.abs(ours - ref).max() / np.abs(ref).max()
            assert rel <= 1e-6, f"{row} {layer}.reparam_conv.{leaf}: relative diff {rel:.3g}"


@pytest.mark.parametrize("row", LCNET_ROWS)
def test_unfused_and_fused_agree(conversions, row):
    """Exact in float64 (the fusion is algebra); in float32 within the measured round-off of both forms."""
    trained = conversions(fd.train_tar(row), ROWS[row], "train").model
    unfused64 = copy.deepcopy(trained).double()
    fused64 = copy.deepcopy(unfused64)
    fused64.reparameterize()
    fused32 = copy.deepcopy(trained)
    fused32.reparameterize()
    for name, x, _ in expected_cases(row):
        with torch.inference_mode():
            u64 = unfused64(torch.from_numpy(x).double()).numpy()
            f64 = fused64(torch.from_numpy(x).double()).numpy()
        assert np.abs(u64 - f64).max() <= 1e-9, f"{row} {name}: float64 fused vs unfused"
        (u32,), (f32,) = outputs(trained, x), outputs(fused32, x)
        floor = max(np.abs(u32 - u64).max(), np.abs(f32 - f64).max())
        assert floor <= MAX_FLOOR
        assert np.abs(u32 - f32).max() <= max(ISSUE_ATOL, FLOOR_MARGIN * floor)


@pytest.mark.parametrize("row,rule,count", [
    ("ch_PP-OCRv4_det", "unused_act_after_stride2", 8),
    ("ch_PP-OCRv4_rec", "nrtr_gtc_training_only", 84),
    ("en_PP-OCRv4_rec", "nrtr_gtc_training_only", 84),
])
def test_trained_checkpoints_report_every_dropped_key_with_its_rule(conversions, row, rule, count):
    weights = paddle_io.load(fd.train_tar(row))
    conversion = conversions(fd.train_tar(row), ROWS[row], "train")
    assert {r for _, _, r in conversion.dropped} == {rule}
    assert len(conversion.dropped) == count
    pattern = {"unused_act_after_stride2": r"^backbone\.blocks[3-6]\.0\.dw_conv\.act\.lab\.",
               "nrtr_gtc_training_only": r"^head\.(gtc_head|before_gtc)\."}[rule]
    assert {k for k, _, _ in conversion.dropped} == {k for k in weights if re.match(pattern, k)}
    for key, shape, _ in conversion.dropped:
        assert shape == tuple(weights[key].shape)
    mapped = {source for source, _, _ in conversion.renamed} | set(conversion.state_dict)
    assert all(k in mapped or k in {d[0] for d in conversion.dropped} for k in weights)


def test_rec_training_archive_with_only_student_pdparams_is_read_and_converted(conversions):
    """ch_PP-OCRv4_rec_train ships only student.pdparams (no best_accuracy): the default choice reads it."""
    tar = fd.train_tar("ch_PP-OCRv4_rec")
    with tarfile.open(tar) as archive:
        assert [m.name.rsplit("/", 1)[-1] for m in archive.getmembers() if m.isfile()] == ["student.pdparams"]
    weights = paddle_io.load(tar)
    assert weights.kind == "trained" and weights.meta["file"].endswith("/student.pdparams")
    conversion = conversions(tar, "PP-OCRv4_mobile_rec")
    assert conversion.config["head"]["out_channels"] == 6625
    assert any("rep_fuse" in note for note in conversion.notes)


def _release_spelling(key: str) -> str:
    key = re.sub(r"\.act\.lab\.(scale|bias)$", r".activation.\1", key)
    return re.sub(r"\.lab\.(scale|bias)$", lambda m: ".w" if m[1] == "scale" else ".b", key)


@pytest.mark.parametrize("row", ["ch_PP-OCRv4_det", "ch_PP-OCRv4_rec"])
def test_release_lab_spelling_converts_by_named_rules(conversions, row):
    """Release inference models name the LABs <p>.w / <p>.b / <p>.activation.*; same tensors, same model."""
    public = paddle_io.load(shipped_infer_tar(row))
    release = {_release_spelling(k): v for k, v in public.items()}
    assert sum(k.endswith((".w", ".b")) for k in release) == 2 * sum(k.endswith(".lab.scale") for k in public
                                                                     if ".act." not in k)
    reference = conversions(shipped_infer_tar(row), ROWS[row])
    conversion = convert(release, ROWS[row], kind="inference")
    assert conversion.state_dict.keys() == reference.state_dict.keys()
    assert all(torch.equal(conversion.state_dict[k], reference.state_dict[k]) for k in reference.state_dict)
    rules = {}
    for source, target, rule in conversion.renamed:
        rules.setdefault(rule, []).append((source, target))
    assert ("backbone.blocks2.0.dw_conv.w", "backbone.blocks2.0.dw_conv.lab.scale") in rules["release_lab_name"]
    assert ("backbone.blocks6.3.pw_conv.activation.bias",
            "backbone.blocks6.3.pw_conv.act.lab.bias") in rules["release_act_lab_name"]
    assert conversion.dropped == []


@pytest.mark.parametrize("row,extra,rule", [
    ("ch_PP-OCRv4_det", {"backbone.conv1.hardswish.scale": (1,), "backbone.conv1.hardswish.bias": (1,)},
     "unused_conv1_hardswish"),
    ("ch_PP-OCRv4_rec", {"backbone.last_conv.weight": (1280, 480, 1, 1), "backbone.hardswish.scale": (1,),
                         "backbone.fc.weight": (1280, 1000), "backbone.fc.bias": (1000,)},
     "unused_rec_backbone_tail"),
])
def test_release_extra_keys_are_dropped_by_named_rules(row, extra, rule):
    """Released trained v4 checkpoints carry backbone.conv1.hardswish.*; the release rec code also has a
    classification tail. Both are reported as dropped, with the rule's name and the tensor's shape."""
    weights = dict(paddle_io.load(shipped_infer_tar(row)))
    weights.update({k: np.zeros(shape, np.float32) for k, shape in extra.items()})
    conversion = convert(weights, ROWS[row], kind="inference")
    assert sorted(conversion.dropped) == sorted((k, shape, rule) for k, shape in extra.items())


@pytest.mark.parametrize("path", [shipped_infer_tar(row) for row in LCNET_ROWS]
                         + [fd.FIXTURES / "ch_PP-OCRv4_det" / "ch_PP-OCRv4_det_train.tar"], ids=lambda p: p.name)
def test_detect_family_recognises_fused_and_training_forms(path):
    row = path.parent.name
    assert detect_family(paddle_io.load(path)) == ROWS[row]


def test_weights_of_another_family_are_refused():
    weights = paddle_io.load(shipped_infer_tar("ch_PP-OCRv4_rec"))
    with pytest.raises(FamilyError, match="PP-OCRv4_mobile_det"):
        convert(weights, "PP-OCRv4_mobile_det")


# ------------------------------------------------------------------------------------ against Paddle


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    """Cache: inference tar -> Paddle's program (un-optimised predictor, identical to paddle.jit.load)."""
    from converter import parity
    from converter.unpack import safe_extract

    cache = {}

    def get(tar):
        if str(tar) not in cache:
            dest = tmp_path_factory.mktemp("program")
            safe_extract(tar, dest)
            cache[str(tar)] = parity.PaddleProgram(dest, threads=1)
        return cache[str(tar)]

    return get


MORE_SHAPES = {
    "det": [(1, 3, 640, 480), (3, 3, 320, 320), (1, 3, 480, 640)],
    "rec": [(1, 3, 48, 160), (1, 3, 48, 960), (3, 3, 48, 320)],
}
# the server det model costs ~30x the mobile one: 640x480 once, the other two shapes smaller
SERVER_DET_SHAPES = [(1, 3, 640, 480), (3, 3, 160, 192), (1, 3, 224, 352)]


@pytest.mark.paddle
@pytest.mark.parametrize("row", list(ALL_ROWS))
def test_paddle_program_vs_pytorch_on_more_shapes(conversions, programs, row):
    family = ALL_ROWS[row]
    tar = fd.infer_tar(row) if row in SERVER_ROWS else shipped_infer_tar(row)
    conversion = conversions(tar, family)
    program = programs(tar)
    shapes = SERVER_DET_SHAPES if row == "ch_PP-OCRv4_server_det" else MORE_SHAPES[family.rsplit("_", 1)[1]]
    for i, shape in enumerate(shapes):
        x = np.random.RandomState(100 + i).uniform(0, 1, shape).astype(np.float32)
        check_against(conversion.model, x, program(x), f"{row} {shape}")


@pytest.mark.paddle
@pytest.mark.slow
@pytest.mark.parametrize("seed", [None, 7])
@pytest.mark.parametrize("row", list(SERVER_ROWS))
def test_materialized_server_rows_both_artifacts(conversions, programs, row, seed):
    family = SERVER_ROWS[row]
    program = programs(fd.infer_tar(row, seed))
    info = fd.row_info(row)
    x0 = np.random.RandomState(0).uniform(0, 1, info["x0_shape"]).astype(np.float32)
    x1 = np.random.RandomState(1).uniform(0, 1, info["x1_shape"]).astype(np.float32)
    expected = {name: program(x) for name, x in (("x0", x0), ("x1", x1))}
    inference = conversions(fd.infer_tar(row, seed), family)
    for name, x in (("x0", x0), ("x1", x1)):
        check_against(inference.model, x, expected[name], f"{row} seed={seed} inference {name}")
    # The trained checkpoint holds the same tensors (plus training-only branches): equal state dicts prove
    # equal outputs without running the server model three more times.
    for form in ("deploy", "train"):
        trained = conversions(fd.train_tar(row, seed), family, form)
        extra = trained.state_dict.keys() - inference.state_dict.keys()
        assert inference.state_dict.keys() <= trained.state_dict.keys()
        assert all(torch.equal(trained.state_dict[k], v) for k, v in inference.state_dict.items())
        if family.endswith("_det"):  # the trained checkpoint keeps the DB threshold branch
            assert extra == {k for k in trained.state_dict if k.startswith("head.thresh.")} and extra
            with torch.inference_mode():
                trained_out = trained.model(torch.from_numpy(x0))
            for ours, theirs in zip(trained_out, outputs(inference.model, x0)):
                np.testing.assert_array_equal(ours.numpy(), theirs)
        else:
            assert not extra
            assert {r for _, _, r in trained.dropped} == {"nrtr_gtc_training_only"}


@pytest.mark.parametrize("row", LCNET_ROWS[:2])
def test_state_dict_fusion_equals_the_modules_reparameterize(conversions, row):
    """The deploy form of a trained checkpoint is fused in the state dict (rule rep_fuse) with the function the
    module's reparameterize() uses: the tensors are bit-identical, and every branch key is accounted for."""
    tar = fd.train_tar(row)
    deploy = conversions(tar, ROWS[row])
    trained = convert(paddle_io.load(tar), ROWS[row], form="train")
    trained.model.reparameterize()
    fused = trained.model.state_dict()
    assert fused.keys() == deploy.state_dict.keys()
    assert all(torch.equal(fused[k], deploy.state_dict[k]) for k in fused)
    fused_sources = {source for source, _new, rule in deploy.renamed if rule == "rep_fuse"}
    assert len(fused_sources) == sum(1 for k in trained.state_dict if re.search(r"\.(conv_kxk|conv_1x1|identity)\.", k)
                                     and not k.endswith("num_batches_tracked"))


def test_incomplete_rep_branches_are_reported_not_fused():
    """A layer whose branch tensors are incomplete is left as is and named by the strict key check."""
    weights = dict(paddle_io.load(fd.train_tar("ch_PP-OCRv4_det")))
    victim = next(k for k in weights if k.endswith("dw_conv.conv_1x1.bn._variance"))
    del weights[victim]
    with pytest.raises(KeyMismatchError) as info:
        convert(weights, "PP-OCRv4_mobile_det", kind="trained")
    layer = victim.removeprefix("Student.").rsplit(".conv_1x1.", 1)[0]
    assert f"{layer}.reparam_conv.weight" in str(info.value) and f"{layer}.conv_kxk.0.conv.weight" in str(info.value)


def test_rep_branches_of_mismatched_shapes_are_named():
    weights = dict(paddle_io.load(fd.train_tar("ch_PP-OCRv4_det")))
    victim = next(k for k in weights if k.endswith("pw_conv.conv_kxk.1.bn._mean"))
    weights[victim] = weights[victim][:-1].copy()
    with pytest.raises(FamilyError, match=r"cannot be fused.*" + re.escape(victim)):
        convert(weights, "PP-OCRv4_mobile_det", kind="trained")
