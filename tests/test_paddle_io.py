"""converter.paddle_io: reading every Paddle weight format without Paddle, safely and exactly."""
from __future__ import annotations

import codecs
import collections
import hashlib
import io
import json
import mmap
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

import fixture_data as fd
from converter import _protobuf as pb
from converter.errors import CorruptWeightsError, UnsafeCheckpointError, UnsupportedFormatError
from converter.paddle_io import PaddleWeights, load

ALL_ROWS = fd.all_rows()
SHIPPED_INFER_ROWS = [r for r in ALL_ROWS if fd.row_info(r)["form"] in ("full", "hybrid")]
FULL_ROWS = [r for r in ALL_ROWS if fd.row_info(r)["form"] == "full"]
KEYED_ROWS = [r for r in ALL_ROWS if fd.row_info(r)["form"] in ("hybrid", "graph")]
REAL = {  # folder -> (program params, .info entries, feed shape, fetch shape)
    "ch_PP-OCRv4_det_infer": (234, 276, (-1, 3, -1, -1), (-1, 1, -1, -1)),
    "ch_PP-OCRv4_rec_infer": (234, 344, (-1, 3, 48, -1), (-1, -1, 6625)),
    "ch_ppocr_mobile_v2_cls_infer": (213, 213, (-1, 3, -1, -1), (-1, 2)),
}


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _train_keys(row: str) -> dict:
    return json.loads((fd.FIXTURES / row / "train_keys.json").read_text())["files"]


@pytest.fixture(scope="session")
def cls_dir(tmp_path_factory) -> Path:
    """The cls fixture's inference folder, unpacked (small: 0.5 MB of weights)."""
    dest = tmp_path_factory.mktemp("cls")
    with tarfile.open(fd.infer_tar("ch_ppocr_mobile_v2.0_cls")) as tar:
        tar.extractall(dest, filter="data")
    return dest / "ch_ppocr_mobile_v2.0_cls_infer"


@pytest.fixture(scope="session")
def cls_weights(cls_dir) -> PaddleWeights:
    return load(cls_dir)


# ----------------------------------------------------------------------------- inference fixtures


@pytest.mark.parametrize("row", ALL_ROWS)
def test_inference_fixture_matches_program_and_info(row):
    info = fd.row_info(row)
    tar = fd.infer_tar(row)
    weights = load(tar)
    program = weights.program
    assert weights.kind == "inference" and weights.source == tar
    assert weights.meta["file"] == f"{info['infer_dirname']}/inference.pdiparams"
    assert weights.meta["paddle_version"] == "2.6.2"
    # one array per persistable program variable, each with the program's shape and dtype
    assert len(weights) == len(program.params) > 100
    assert sorted(weights.param_names.values()) == [p.name for p in program.params]
    for key, array in weights.items():
        var = program.vars[weights.param_names[key]]
        assert array.shape == tuple(var.tensor.dims) and array.dtype == np.float32, key
    # every program parameter is named by the .info; the rest of the .info is reported as info_only
    assert weights.meta["unnamed_params"] == []
    assert len(weights) + len(weights.info_only) == info["n_info_entries"]
    assert not set(weights.info_only) & set(weights)
    # feeds and fetches
    assert [(f.name, f.shape, f.dtype) for f in program.feeds] == [("x", tuple(info["input_spec"]), "float32")]
    assert [f.name for f in program.fetches] == info["fetch_names"]
    assert len(program.fetches) == len(info["y0_shapes"])
    with tarfile.open(tar) as t:
        member = t.extractfile(f"{info['infer_dirname']}/inference.pdiparams").read()
    assert weights.sha256 == hashlib.sha256(member).hexdigest()
    assert weights.meta["size"] == len(member) > weights.nbytes


@pytest.mark.parametrize("row", SHIPPED_INFER_ROWS)
def test_student_checkpoint_equals_inference_arrays(row):
    """Trained Student arrays are bit-identical to the inference arrays of the same structured name."""
    info = fd.row_info(row)
    inference = load(fd.infer_tar(row))
    trained = load(fd.train_tar(row), prefer="student.pdparams" if "student.pdparams" in info["train_files"]
                   else None)
    prefix = "" if trained.meta["file"].endswith("student.pdparams") else (info["student_prefix"] or "")
    compared = 0
    for key, array in inference.items():
        other = trained.get(prefix + key)
        if other is not None and other.shape == array.shape:
            assert _same(other, array), key
            compared += 1
    # rep-fused exports replace the PPLCNetV3 branches by reparam_conv; everything else must be there
    assert compared >= (len(inference) // 3 if info["rep_fused"] else len(inference)), compared


@pytest.mark.parametrize("row", KEYED_ROWS)
def test_trained_fixture_matches_train_keys(row):
    tar = fd.train_tar(row)
    for filename, rows in _train_keys(row).items():
        weights = load(tar, prefer=filename)
        assert weights.kind == "trained" and weights.meta["file"].endswith("/" + filename)
        assert weights.meta["pickle_protocol"] == 4 and weights.meta["numpy_module"] == ["numpy.core.multiarray"]
        assert list(weights) == [r[0] for r in rows]
        for key, shape, dtype, paddle_name, alias_of in rows:
            assert weights[key].shape == tuple(shape) and weights[key].dtype.name == dtype, key
            assert weights.param_names[key] == paddle_name
            if alias_of is not None:
                assert _same(weights[key], weights[alias_of])


@pytest.mark.parametrize("row", FULL_ROWS)
def test_full_row_trained_tar(row):
    info = fd.row_info(row)
    weights = load(fd.train_tar(row))
    in_dir = [f"{info['train_dirname']}/{f}" for f in sorted(info["train_files"])]
    assert weights.meta["candidates"] == [f for f in in_dir if f.endswith(".pdparams")]
    assert weights.meta["other_files"] == [f for f in in_dir if not f.endswith(".pdparams")]
    assert weights.meta["name_table"] and set(weights.param_names) == set(weights)
    prefixes = {k.split(".")[0] + "." for k in weights if k.split(".")[0] in info["train_key_prefixes"]}
    assert prefixes == {p + "." for p in info["train_key_prefixes"]}


def test_states_file_is_readable():
    weights = load(fd.train_tar("en_number_mobile_v2.0_rec"), prefer="best_accuracy.states")
    assert len(weights) == 0 and weights.meta["pickle_protocol"] == 2
    assert weights.meta["values"]["epoch"] == 1 and weights.meta["values"]["best_model_dict.best_epoch"] == 1


@pytest.mark.real
@pytest.mark.parametrize("folder", sorted(REAL))
def test_real_inference_models(real_models, folder):
    n_params, n_info, feed_shape, fetch_shape = REAL[folder]
    weights = load(real_models / folder / "inference")
    assert len(weights) == len(weights.program.params) == n_params
    assert len(weights) + len(weights.info_only) - len(weights.meta["unnamed_params"]) == n_info
    assert weights.meta["paddle_version"].startswith("2.")
    assert [f.shape for f in weights.program.feeds] == [feed_shape]
    assert [f.shape for f in weights.program.fetches] == [fetch_shape]
    assert weights.meta["size"] == (real_models / folder / "inference.pdiparams").stat().st_size
    for key, array in weights.items():
        assert array.shape == tuple(weights.program.vars[weights.param_names[key]].tensor.dims), key


# ----------------------------------------------------------------------------- path forms and choice


def test_every_path_form_reads_the_same_arrays(cls_dir, cls_weights):
    assert cls_weights.source == cls_dir / "inference"
    for path in (cls_dir / "inference", cls_dir / "inference.pdmodel", cls_dir / "inference.pdiparams",
                 cls_dir / "inference.pdiparams.info", cls_dir.parent):
        other = load(path)
        assert list(other) == list(cls_weights) and all(_same(other[k], cls_weights[k]) for k in other)
        assert other.sha256 == cls_weights.sha256


@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_tar_members_read_like_files(cls_dir, cls_weights, tmp_path, mode):
    """Plain tars are read straight from the archive file, compressed ones through tarfile: same arrays."""
    checkpoint = _write_pickle(tmp_path / "best_accuracy.pdparams", ARRAYS, 4)
    tar_path = tmp_path / ("m.tar.gz" if mode == "w:gz" else "m.tar")
    with tarfile.open(tar_path, mode) as tar:
        tar.add(checkpoint, arcname="m_train/best_accuracy.pdparams")
        for name in ("inference.pdmodel", "inference.pdiparams", "inference.pdiparams.info"):
            tar.add(cls_dir / name, arcname=f"m_infer/{name}")
    trained = load(tar_path, kind="trained")
    assert list(trained) == list(ARRAYS) and all(_same(trained[k], ARRAYS[k]) for k in ARRAYS)
    inference = load(tar_path, kind="inference")
    assert list(inference) == list(cls_weights) and all(_same(inference[k], cls_weights[k]) for k in inference)
    assert inference.sha256 == cls_weights.sha256


def test_large_payloads_are_mapped_not_read(tmp_path):
    """Arrays of >= 1 MiB are copy-on-write views of the file (plain or inside a plain tar), equal to the saved ones,
    writable without touching the file; smaller ones, big-endian and Fortran-order arrays keep their values."""
    rs = np.random.RandomState(5)
    state = {"big": rs.standard_normal((300, 1001)).astype(np.float32),  # 1.2 MB, at an unaligned offset
             "small": rs.standard_normal(7).astype(np.float32),
             "big_be": rs.standard_normal(300_000).astype(">f8"),
             "big_f": np.asfortranarray(rs.standard_normal((600, 500)))}
    path = _write_pickle(tmp_path / "best_accuracy.pdparams", state, 4)
    original = path.read_bytes()
    tar_path = tmp_path / "m_train.tar"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(path, arcname="m_train/best_accuracy.pdparams")
    for source in (path, tar_path):
        weights = load(source)
        for key, array in state.items():
            assert weights[key].tolist() == array.tolist(), (source, key)
        assert weights["big_be"].dtype == np.float64 and weights["big_f"].flags.f_contiguous
        mapped = weights["big"]
        assert mapped.base is not None and not isinstance(mapped.base, bytes) and mapped.flags.writeable
        mapped[0, 0] = 42.0
        assert torch.from_numpy(mapped).sum().item() == pytest.approx(float(mapped.astype(np.float64).sum()), rel=1e-4)
    assert path.read_bytes() == original


def test_large_inference_tensors_are_mapped_not_read(tmp_path):
    """.pdiparams tensors of >= 1 MiB are copy-on-write views of the file (plain, or a plain tar member), equal to
    what a full read gives (a gzip tar cannot be mapped), and writable without touching the file."""
    tar = fd.infer_tar("ch_PP-OCRv4_rec")
    gz = tmp_path / "model.tar.gz"
    with tarfile.open(tar) as src, tarfile.open(gz, "w:gz", compresslevel=1) as dst:
        for member in src.getmembers():
            dst.addfile(member, src.extractfile(member) if member.isfile() else None)
    read = load(gz)
    big = [key for key, array in read.items() if array.nbytes >= 1 << 20]
    assert big and all(read[key].flags.owndata for key in big)
    folder = _extract(tar, tmp_path / "plain")
    params = next(folder.rglob("inference.pdiparams"))
    original = params.read_bytes()
    for source in (tar, params.parent):
        weights = load(source)
        assert weights.keys() == read.keys()
        assert all(np.array_equal(weights[key], read[key]) for key in read)
        for key in big:
            array = weights[key]
            root = array
            while isinstance(root, np.ndarray):
                root = root.base
            assert isinstance(getattr(root, "obj", root), mmap.mmap) and array.flags.writeable, key
            array.fill(7.0)
    assert params.read_bytes() == original


def test_appledouble_files_are_ignored(cls_dir):
    assert (cls_dir / "._inference.pdmodel").is_file()  # shipped like the real tar
    assert load(cls_dir).meta["candidates"] == ["inference.pdmodel"]


def test_missing_info_falls_back_to_var_names(cls_dir, cls_weights, tmp_path):
    for name in ("inference.pdmodel", "inference.pdiparams"):
        (tmp_path / name).write_bytes((cls_dir / name).read_bytes())
    weights = load(tmp_path)
    assert set(weights) == set(cls_weights.param_names.values())
    assert weights.meta["files"]["info"] is None and weights.info_only == {}


def _write_pickle(path: Path, obj, protocol: int = 4) -> Path:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


def test_trained_choice_order_and_prefer(tmp_path):
    arrays = {"w": np.arange(3, dtype=np.float32)}
    for name in ("best_accuracy.pdparams", "student.pdparams", "latest.pdparams"):
        _write_pickle(tmp_path / name, {**arrays, "which": np.array([len(name)])})
    (tmp_path / "best_accuracy.pdopt").write_bytes(pickle.dumps({"m": np.zeros(2)}))
    weights = load(tmp_path)
    assert weights.meta["file"] == "best_accuracy.pdparams"
    assert weights.meta["candidates"] == ["best_accuracy.pdparams", "latest.pdparams", "student.pdparams"]
    assert weights.meta["other_files"] == ["best_accuracy.pdopt"]
    assert load(tmp_path, prefer="student.pdparams")["which"][0] == len("student.pdparams")
    assert set(load(tmp_path, prefer="best_accuracy.pdopt")) == {"m"}
    (tmp_path / "best_accuracy.pdparams").unlink()
    assert load(tmp_path).meta["file"] == "student.pdparams"
    (tmp_path / "student.pdparams").unlink()
    assert load(tmp_path).meta["file"] == "latest.pdparams"
    _write_pickle(tmp_path / "other.pdparams", arrays)
    with pytest.raises(UnsupportedFormatError, match="several checkpoints"):
        load(tmp_path)
    with pytest.raises(UnsupportedFormatError, match="matches 0"):
        load(tmp_path, prefer="nope.pdparams")


def test_suffixless_checkpoint_is_sniffed(tmp_path):
    _write_pickle(tmp_path / "best_accuracy", {"w": np.ones(2, np.float32)})
    assert load(tmp_path).meta["file"] == "best_accuracy"
    assert load(tmp_path / "best_accuracy")["w"].tolist() == [1.0, 1.0]


def test_mixed_folder_needs_a_kind(cls_dir, tmp_path):
    for name in ("inference.pdmodel", "inference.pdiparams", "inference.pdiparams.info"):
        (tmp_path / name).write_bytes((cls_dir / name).read_bytes())
    _write_pickle(tmp_path / "best_accuracy.pdparams", {"w": np.ones(2, np.float32)})
    with pytest.raises(UnsupportedFormatError, match="both an inference model"):
        load(tmp_path)
    assert load(tmp_path, kind="inference").kind == "inference"
    assert list(load(tmp_path, kind="trained")) == ["w"]


def test_unreadable_paths(tmp_path):
    with pytest.raises(UnsupportedFormatError, match="no such file"):
        load(tmp_path / "missing")
    with pytest.raises(UnsupportedFormatError, match="no .*Paddle weights found"):
        load(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UnsupportedFormatError, match="not a Paddle weight file"):
        load(tmp_path / "notes.txt")
    (tmp_path / "inference.json").write_text("{}")
    (tmp_path / "inference.pdiparams").write_bytes(b"")
    with pytest.raises(UnsupportedFormatError, match="PIR program"):
        load(tmp_path)
    (tmp_path / "x.pdmodel").write_bytes(b"")
    with pytest.raises(UnsupportedFormatError, match="missing"):
        load(tmp_path / "x.pdmodel")
    with pytest.raises(UnsupportedFormatError, match="not a readable tar"):
        (tmp_path / "broken.tar").write_bytes(b"\0" * 100 + b"ustar" + b"\0" * 2000)
        load(tmp_path / "broken.tar")


def test_prefer_must_agree_with_kind(tmp_path):
    prefix = _tiny_inference(tmp_path / "m_infer")
    (tmp_path / "m_train").mkdir()
    _write_pickle(tmp_path / "m_train" / "best_accuracy.pdparams", {"w": np.ones(2, np.float32)})
    _write_pickle(tmp_path / "m_train" / "best_accuracy.pdopt", {"m": np.zeros(2)})
    for prefer in ("best_accuracy.pdopt", "best_accuracy.pdparams"):
        with pytest.raises(UnsupportedFormatError, match=rf"prefer='{prefer}' names the trained file "
                                                         rf"m_train/{prefer}, but kind='inference' was asked for"):
            load(tmp_path, prefer=prefer, kind="inference")
    with pytest.raises(UnsupportedFormatError, match="names the inference file m_infer/inference.pdmodel, but "
                                                     "kind='trained'"):
        load(tmp_path, prefer="inference", kind="trained")
    assert load(tmp_path, prefer="best_accuracy.pdopt", kind="trained").meta["file"] == "m_train/best_accuracy.pdopt"
    assert load(tmp_path, prefer="inference", kind="inference").source == prefix


def test_prefer_must_name_the_file_of_a_single_file_path(tmp_path):
    path = _write_pickle(tmp_path / "latest.pdparams", {"w": np.ones(2, np.float32)})
    assert list(load(path, prefer="latest.pdparams")) == ["w"]
    with pytest.raises(UnsupportedFormatError,
                       match=r"latest\.pdparams: prefer='best_accuracy.pdparams' names another file than the one "
                             r"this path reads \(latest\.pdparams\)"):
        load(path, prefer="best_accuracy.pdparams")
    prefix = _tiny_inference(tmp_path / "m_infer")
    assert list(load(prefix, prefer="inference")) == ["w"]
    with pytest.raises(UnsupportedFormatError, match=r"names another file .*\(inference\.pdmodel\)"):
        load(prefix, prefer="student")


def test_hidden_folders_are_skipped_in_tars_as_in_folders(tmp_path):
    for folder in ("m_train", ".ipynb_checkpoints"):
        (tmp_path / "m" / folder).mkdir(parents=True)
        _write_pickle(tmp_path / "m" / folder / "best_accuracy.pdparams", {"which": np.array([len(folder)])})
    tar_path = tmp_path / "m.tar"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(tmp_path / "m", arcname="m")
    for source in (tmp_path / "m", tar_path):
        weights = load(source)
        assert weights["which"][0] == len("m_train") and len(weights.meta["candidates"]) == 1, source


def test_locations_in_messages(tmp_path):
    prefix = _tiny_inference(tmp_path / "m_infer")
    with pytest.raises(UnsupportedFormatError, match=r"inference\.pdmodel: is an inference file, not trained"):
        load(tmp_path / "m_infer" / "inference.pdmodel", kind="trained")
    tar_path = tmp_path / "m.tar"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(prefix.with_suffix(".pdiparams"), arcname="m/inference.pdiparams")
    with pytest.raises(UnsupportedFormatError) as excinfo:
        load(tar_path)
    assert str(excinfo.value).startswith(f"{tar_path}: no Paddle weights found")


# ----------------------------------------------------------------------------- pickle forms


class _AsTuple:
    """Pickles like Paddle 2.1's reduce_varbase: tuple((name, ndarray))."""

    def __init__(self, name, array):
        self.name, self.array = name, array

    def __reduce__(self):
        return (tuple, ((self.name, self.array),))


class _AsEval:
    """Pickles like Paddle's reduce_DenseTensor: eval('data', {'data': ndarray})."""

    def __init__(self, array):
        self.array = array

    def __reduce__(self):
        return (eval, ("data", {"data": self.array}))


ARRAYS = {
    "conv.weight": np.random.RandomState(0).standard_normal((4, 3, 3, 3)).astype(np.float32),
    "bn._mean": np.linspace(-1, 1, 4, dtype=np.float64),
    "ids": np.arange(-3, 3, dtype=np.int64).reshape(2, 3),
    "half": np.array([1.5, -2.25], dtype=np.float16),
    "mask": np.array([True, False]),
    "scalar": np.array(3.5, dtype=np.float32),
    "empty": np.zeros((0, 5), dtype=np.float32),
    "fortran": np.asfortranarray(np.arange(6, dtype=np.int32).reshape(2, 3)),
    "bytes_hi": np.frombuffer(bytes(range(256)), dtype=np.uint8),
}


@pytest.mark.parametrize("protocol", [2, 3, 4])
def test_state_dict_protocols(tmp_path, protocol):
    state = {**ARRAYS, "StructuredToParameterName@@": {k: f"var_{i}" for i, k in enumerate(ARRAYS)}}
    path = _write_pickle(tmp_path / "m.pdparams", state, protocol)
    weights = load(path)
    assert list(weights) == list(ARRAYS) and all(_same(weights[k], ARRAYS[k]) for k in ARRAYS)
    assert weights.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert weights["fortran"].flags.f_contiguous
    assert weights.param_names["ids"] == "var_2" and weights.meta["pickle_protocol"] == protocol
    assert weights.meta["numpy_module"] == ["numpy._core.multiarray"]  # written here under numpy 2


def test_tuple_eval_nested_and_ordered_forms(tmp_path):
    a, b = ARRAYS["conv.weight"], ARRAYS["ids"]
    state = collections.OrderedDict([
        ("conv.weight", _AsTuple("conv2d_0.w_0", a)),
        ("dense", _AsEval(b)),
        ("opt", {"LR_Scheduler": {"last_epoch": 3, "last_lr": np.float64(0.5)}, "moment": _AsTuple("m_0", b)}),
        ("shape_set", {1, 2}),
    ])
    weights = load(_write_pickle(tmp_path / "m.pdparams", state, 2))
    assert _same(weights["conv.weight"], a) and _same(weights["dense"], b) and _same(weights["opt.moment"], b)
    assert weights.param_names == {"conv.weight": "conv2d_0.w_0", "opt.moment": "m_0"}
    assert weights.meta["values"]["opt.LR_Scheduler.last_lr"] == 0.5
    assert weights.meta["values"]["shape_set"] == {1, 2}
    assert set(weights.meta["forms"]) == {"ndarray", "tuple(name, ndarray)", "nested dict"}


def test_big_param_slices_are_joined(tmp_path):
    big = np.arange(30, dtype=np.float32).reshape(5, 6)
    flat = big.ravel()
    state = {"small": ARRAYS["ids"], "big@@.0": flat[:13].copy(), "big@@.1": flat[13:26].copy(),
             "big@@.2": flat[26:].copy(),
             "UnpackBigParamInfor@@": {"big": {"OriginShape": (5, 6), "slices": ["big@@.0", "big@@.1", "big@@.2"]}},
             "StructuredToParameterName@@": {"small": "s_0", "big": "b_0"}}
    weights = load(_write_pickle(tmp_path / "m.pdparams", state, 2))
    assert list(weights) == ["small", "big"] and _same(weights["big"], big)
    assert weights.meta["big_params_joined"] == ["big"] and weights.param_names["big"] == "b_0"
    state["UnpackBigParamInfor@@"]["big"]["OriginShape"] = (5, 7)
    with pytest.raises(CorruptWeightsError, match="OriginShape"):
        load(_write_pickle(tmp_path / "m.pdparams", state, 2))


def test_big_param_slice_names_must_be_strings(tmp_path):
    state = {"w@@.0": np.ones(2), "UnpackBigParamInfor@@": {"w": {"OriginShape": (2,), "slices": [["w@@.0"]]}}}
    path = _write_pickle(tmp_path / "m.pdparams", state, 2)
    with pytest.raises(CorruptWeightsError, match=r"m\.pdparams: UnpackBigParamInfor@@ entry for 'w' lists a list "
                                                  "among its slices"):
        load(path)


def test_big_param_errors_do_not_list_every_slice(tmp_path):
    """One 1 MiB slice name listed 100 times (a 1 MiB file) made a 100 MiB message."""
    name = "w" * (1 << 20)
    state = {name: np.ones(2, np.float32), "UnpackBigParamInfor@@": {"w": {"OriginShape": (2,), "slices": [name] * 100}}}
    with pytest.raises(CorruptWeightsError, match=r"the 100 slices of big parameter 'w' \(1 distinct\)") as excinfo:
        load(_write_pickle(tmp_path / "m.pdparams", state))
    assert len(str(excinfo.value)) < 1000


@pytest.mark.parametrize("protocol", [2, 4])
def test_arrays_inside_tuples_and_nested_lists_are_found(tmp_path, protocol):
    """paddle.save({"b": (tensor, 3)}) keeps the tuple (its tensor as (name, ndarray)); paddle.load then gives b.0."""
    a, b = ARRAYS["ids"], ARRAYS["half"]
    state = {"b": (_AsTuple("t_0", a), 3), "c": [[b, 1]], "d": (a, "x"), "shapes": [(1, 2), (3, 4)]}
    weights = load(_write_pickle(tmp_path / "m.pdparams", state, protocol))
    assert list(weights) == ["b.0", "c.0.0", "d.0"]
    assert _same(weights["b.0"], a) and _same(weights["c.0.0"], b) and weights.param_names == {"b.0": "t_0"}
    assert weights.meta["values"] == {"b.1": 3, "c.0.1": 1, "d.1": "x", "shapes": [[1, 2], [3, 4]]}


def test_flattened_name_collisions_are_refused(tmp_path):
    state = {"head.fc": {"weight": np.zeros(2, np.float32)}, "head.fc.weight": np.ones(3, np.float32)}
    with pytest.raises(CorruptWeightsError, match=r"m\.pdparams: two entries of the state are both named "
                                                  r"'head\.fc\.weight'"):
        load(_write_pickle(tmp_path / "m.pdparams", state))


@pytest.mark.parametrize("protocol", [2, 4])
def test_numpy_before_1_19_dtype_flags_are_accepted(tmp_path, protocol):
    """numpy < 1.19 pickled dtypes as dtype('f4', 0, 1): the ints 0 and 1 where numpy now writes False, True."""
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    data = pickle.dumps({"w": array}, protocol=protocol)
    assert data.count(b"\x89\x88") == 1  # NEWFALSE NEWTRUE: the dtype's flags
    path = tmp_path / "m.pdparams"
    path.write_bytes(data.replace(b"\x89\x88", b"K\x00K\x01"))
    assert _same(load(path)["w"], array)
    path.write_bytes(data.replace(b"\x89\x88", b"K\x00K\x02"))
    with pytest.raises(UnsafeCheckpointError, match="refused call to numpy.dtype"):
        load(path)


class _HashableArray:
    """Pickles as an ndarray but can be a dict key or set member here, as in a hostile pickle."""

    def __init__(self, array):
        self.array = array

    def __reduce__(self):
        return self.array.__reduce__()


@pytest.mark.parametrize("case", ["dict key", "inside a tuple key", "in a set", "inside a tuple in a set"])
def test_arrays_in_keys_or_sets_are_corrupt(tmp_path, case):
    array = _HashableArray(ARRAYS["ids"])
    state = {"dict key": {array: 1}, "inside a tuple key": {(array, 1): 1}, "in a set": {"a": {array}},
             "inside a tuple in a set": {"a": {(array, 1)}}}[case]
    path = _write_pickle(tmp_path / "m.pdparams", state)
    with pytest.raises(CorruptWeightsError, match=r"m\.pdparams: (a dict key is unhashable|the pickle puts an array "
                                                  "in a set)"):
        load(path)


def test_sha256_is_computed_on_first_access(tmp_path):
    path = _write_pickle(tmp_path / "m.pdparams", {"w": ARRAYS["ids"]})
    weights = load(path)
    path.unlink()
    with pytest.raises(UnsupportedFormatError, match="cannot hash it any more"):
        weights.sha256
    assert _same(weights["w"], ARRAYS["ids"])


def test_pickle_of_a_list_is_not_a_state_dict(tmp_path):
    with pytest.raises(UnsupportedFormatError, match="holds a list"):
        load(_write_pickle(tmp_path / "m.pdparams", [np.zeros(2)]))


# ----------------------------------------------------------------------------- hostile pickles


class _Reduce:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def _touch(marker: Path) -> str:
    return f"touch {marker}"


def _hostile(marker: Path) -> dict[str, tuple[bytes, bool, str]]:
    """name -> (pickle bytes, whether plain pickle.loads would create the marker, expected message part)."""
    cmd = _touch(marker).encode()
    valid = ARRAYS["conv.weight"]
    import numpy.testing._private.utils as np_utils  # runstring: exec() reachable through numpy

    code = f"import os; os.system({_touch(marker)!r})"
    return {
        "GLOBAL protocol 0": (b"cos\nsystem\n(S'" + cmd + b"'\ntR.", True, "'os.system'"),
        "GLOBAL posix protocol 0": (b"cposix\nsystem\n(S'" + cmd + b"'\ntR.", True, "'posix.system'"),
        "STACK_GLOBAL protocol 4": (pickle.dumps(_Reduce(os.system, (_touch(marker),)), protocol=4), True,
                                    "system'"),
        "payload after a valid array": (pickle.dumps({"w": valid, "x": _Reduce(os.system, (_touch(marker),))},
                                                     protocol=4), True, "system'"),
        "payload inside a tuple form": (pickle.dumps({"w": ("conv_0", valid, _Reduce(
            subprocess.call, (["touch", str(marker)],)))}, protocol=2), True, "call'"),
        "builtins.getattr trick": (
            b"\x80\x02cbuiltins\ngetattr\ncbuiltins\n__import__\nX\x02\x00\x00\x00os\x85R"
            b"X\x06\x00\x00\x00system\x86RX" + struct.pack("<I", len(cmd)) + cmd + b"\x85R.", True,
            "'builtins.getattr'"),
        "builtins.eval with an expression": (
            pickle.dumps(_Reduce(eval, (f"__import__('os').system({_touch(marker)!r})",)), protocol=4), True,
            "builtins.eval"),
        "builtins.exec": (pickle.dumps(_Reduce(exec, (code,)), protocol=2), True, "exec'"),
        "numpy runstring (exec)": (pickle.dumps(_Reduce(np_utils.runstring, (code, {})), protocol=4), True,
                                   "runstring'"),
        "copyreg._reconstructor": (
            b"\x80\x02ccopyreg\n_reconstructor\ncos\nsystem\ncbuiltins\nobject\nN\x87R.", False,
            "'copyreg._reconstructor'"),
        "INST opcode": (b"(S'" + cmd + b"'\nios\nsystem\n.", True, "'os.system'"),
        "OBJ opcode": (b"(cos\nsystem\nS'" + cmd + b"'\no.", True, "'os.system'"),
        "persistent id": (b"\x80\x02X\x03\x00\x00\x00abcQ.", False, "persistent id"),
        "numpy.load": (pickle.dumps(_Reduce(np.load, (str(marker),)), protocol=4), False, "numpy.load'"),
        "other numpy.core.multiarray attribute": (
            b"\x80\x02cnumpy.core.multiarray\nfromstring\nC\x04abcdX\x02\x00\x00\x00u1\x86R.", False,
            "'numpy.core.multiarray.fromstring'"),
        "_reconstruct with a huge shape": (
            b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n\x8a\x06\x00\x00\x00\x00\x01\x00"
            b"\x85C\x01b\x87R.", False, "_reconstruct"),
        "object dtype array": (pickle.dumps({"w": np.array([None, 1], dtype=object)}, protocol=4), False,
                               "dtype"),
        "NEWOBJ on an allowed class": (b"\x80\x02ccollections\nOrderedDict\n)\x81.", False, "NEWOBJ"),
        "BUILD on an allowed global": (
            b"\x80\x02ccollections\nOrderedDict\n}X\x07\x00\x00\x00factoryX\x03\x00\x00\x00abcsb.", False,
            "BUILD"),
        "BUILD on a dtype already in use": (
            b"\x80\x02cnumpy\ndtype\nX\x02\x00\x00\x00f4\x89\x88\x87Rq\x00"
            b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85C\x01b\x87R"
            b"(K\x01K\x01\x85h\x00\x89C\x04\x00\x00\x80?tb0"
            b"h\x00(K\x03X\x01\x00\x00\x00>NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb.", False,
            "refused BUILD on"),
        "ndarray called directly": (
            b"\x80\x02cnumpy\nndarray\nJ\x00\xe1\xf5\x05\x85\x85R.", False, "ndarray"),
    }


@pytest.mark.parametrize("case", list(_hostile(Path("/tmp/x"))))
def test_hostile_pickle_is_refused_and_runs_nothing(tmp_path, case):
    marker = tmp_path / "pwned"
    data, live, message = _hostile(marker)[case]
    path = tmp_path / "best_accuracy.pdparams"
    path.write_bytes(data)
    with pytest.raises((UnsafeCheckpointError, CorruptWeightsError)) as excinfo:
        load(path)
    assert message in str(excinfo.value) and str(path) in str(excinfo.value)
    if case not in ("_reconstruct with a huge shape",):
        assert isinstance(excinfo.value, UnsafeCheckpointError)
    assert not marker.exists()
    # the same bytes inside a tar are refused too
    tar_path = tmp_path / "evil_train.tar"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(path, arcname="evil_train/best_accuracy.pdparams")
    with pytest.raises((UnsafeCheckpointError, CorruptWeightsError)):
        load(tar_path)
    assert not marker.exists()


def test_hostile_payloads_are_live(tmp_path):
    """The marker-creating cases really create the marker under plain pickle (so the refusal test means something)."""
    cases = {name: data for name, (data, live, _) in _hostile(tmp_path / "MARK").items() if live}
    script = ("import pickle, sys, pathlib\n"
              "data = pathlib.Path(sys.argv[1]).read_bytes()\n"
              "try:\n    pickle.loads(data)\nexcept Exception:\n    pass\n")
    for name, data in cases.items():
        marker = tmp_path / "MARK"
        payload = tmp_path / "payload.pkl"
        payload.write_bytes(data)
        subprocess.run([sys.executable, "-c", script, str(payload)], check=True, cwd=tmp_path, timeout=60)
        assert marker.exists(), name
        marker.unlink()
    assert len(cases) >= 10


def test_guards_reject_bad_arguments(tmp_path):
    def refused(obj_bytes: bytes, match: str):
        path = tmp_path / "m.pdparams"
        path.write_bytes(obj_bytes)
        with pytest.raises(UnsafeCheckpointError, match=match):
            load(path)

    refused(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00utf-8\x86R.", "expected \\(str, 'latin1'\\)")
    refused(b"\x80\x02cbuiltins\nbytes\nJ\x00\xe1\xf5\x05\x85R.", "only bytes\\(\\)")
    refused(b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x00dataX\x01\x00\x00\x00x\x86R.", "only Paddle's eval")
    refused(b"\x80\x02cnumpy\ndtype\nX\x02\x00\x00\x00O8\x89\x88\x87R.", "not a plain numeric dtype")
    refused(b"\x80\x02cnumpy\ndtype\n.", "returns the global numpy.dtype")


@pytest.mark.parametrize("driver", ["C", "pure-Python"])
@pytest.mark.parametrize("case", list(_hostile(Path("/tmp/x"))))
def test_both_unpicklers_refuse_every_hostile_pickle(tmp_path, case, driver):
    """Whichever unpickler a file gets after the opcode scan, the guards refuse the same hostile pickles."""
    from converter import _pickle_safe as ps

    marker = tmp_path / "pwned"
    data = _hostile(marker)[case][0]
    unpickler = ps._FastUnpickler if driver == "C" else ps._PythonUnpickler
    with pytest.raises((UnsafeCheckpointError, CorruptWeightsError)):
        ps._prescan(io.BytesIO(data), len(data), "x")
        ps._finish(unpickler(io.BytesIO(data), ps._Context(len(data), "x")).load(), "x", {})
    assert not marker.exists()


def _dtype_with_state(state: bytes) -> bytes:
    """A protocol 2 pickle of ``{"w": float32 array}`` whose dtype receives ``state`` (a pickled tuple) by BUILD."""
    return (b"\x80\x02}X\x01\x00\x00\x00wcnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85C\x01b\x87R"
            b"(K\x01K\x01\x85cnumpy\ndtype\nX\x02\x00\x00\x00f4\x89\x88\x87R" + state + b"b\x89C\x04\x00\x00\x80?tbs.")


def test_dtype_state_may_only_set_the_byte_order(tmp_path):
    """A dtype BUILD state carrying numpy's object flags would make float data be treated as object pointers."""
    path = tmp_path / "m.pdparams"
    plain = b"(K\x03X\x01\x00\x00\x00>NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t"
    path.write_bytes(_dtype_with_state(plain))
    big_endian = load(path)
    # numpy swaps non-native data to native order when it unpickles: the value is that of the big-endian bytes
    assert big_endian["w"].tolist() == np.frombuffer(b"\x00\x00\x80?", ">f4").tolist() != [1.0]
    for flags in (b"K\x3f", b"K\x01", b"K\x08"):  # NPY_ITEM_REFCOUNT, NPY_ITEM_HASOBJECT bits, NPY_NEEDS_PYAPI
        path.write_bytes(_dtype_with_state(plain.replace(b"K\x00t", flags + b"t")))
        with pytest.raises(UnsafeCheckpointError, match="refused dtype state"):
            load(path)
    path.write_bytes(_dtype_with_state(plain.replace(b"NNN", b"N(X\x01\x00\x00\x00at)N")))
    with pytest.raises(UnsafeCheckpointError, match="refused dtype state"):
        load(path)


PRESCAN_REFUSALS = {  # name -> (pickle bytes, error, message)
    # a memo index far ahead would make the C unpickler size its memo from it
    "memo skip": (b"\x80\x04Nr\xff\xff\xff\x7f.", CorruptWeightsError, "memo index 2147483647 at byte 3 skips ahead"),
    "EXT1": (b"\x80\x02\x82\x01.", UnsafeCheckpointError, "refused opcode EXT1 at byte 2"),
    "BYTEARRAY8": (b"\x80\x05\x96" + struct.pack("<Q", 3) + b"abc.", UnsafeCheckpointError, "refused opcode BYTEARRAY8"),
    "huge FRAME": (b"\x80\x04\x95" + struct.pack("<Q", 1 << 40) + b"N.", CorruptWeightsError,
                   "FRAME at byte 2 asks for 1099511627776 bytes"),
    "unknown opcode": (b"\x80\x04\xff.", CorruptWeightsError, "unknown opcode 0xff at byte 2"),
    "no STOP": (b"\x80\x04N", CorruptWeightsError, "ended at byte 3 without its STOP"),
    # a list filled with itself: a cycle, and a container growing after it was shared would escape the size bound
    "list holding itself": (b"\x80\x04]\x94(h\x00e.", CorruptWeightsError, "byte 7 adds items to an object that is "
                            "not a container, or to a container already referenced elsewhere"),
    "stack underflow": (b"\x80\x04N\x86.", CorruptWeightsError, "opcode near byte 3 uses a stack item"),
    "missing memo entry": (b"\x80\x04h\x05.", CorruptWeightsError, "opcode near byte 2 uses a stack item, mark or"),
}


@pytest.mark.parametrize("case", list(PRESCAN_REFUSALS))
def test_prescan_refusals(tmp_path, case):
    data, error, message = PRESCAN_REFUSALS[case]
    path = tmp_path / "m.pdparams"
    path.write_bytes(data)
    with pytest.raises(error, match=message):
        load(path)


def test_prescan_follows_every_fixed_width_opcode():
    """Each opcode the scan skips by its fixed width also has its effect on the stack for the tree-size bound."""
    from converter import _pickle_safe as ps

    assert [code for code in range(256) if (ps._EFFECT[code] >= 0) != (ps._FIXED_WIDTH[code] >= 0)] == []


def _laughs(depth: int, form: str) -> bytes:
    """A "billion laughs" pickle: object i + 1 references object i twice, a few bytes per level for a tree of
    2 ** depth leaves. ``form``: tuples, lists (filled after they are memoized), tuples used as a dict key, or
    a smaller tuple used as the key of many dicts that are dropped (POP) once built."""
    out = b"\x80\x04" + (b"]" if form == "lists" else b")") + b"\x94"  # memo 0: an empty list / tuple
    for level in range(depth):
        get = b"h" + bytes([level])
        out += b"]\x94(" + get + get + b"e" if form == "lists" else get + get + b"\x86\x94"
    top = b"h" + bytes([depth])
    if form == "key":
        return out + b"}" + top + b"K\x01s."
    if form == "dropped keys":
        return out + (b"}" + top + b"K\x01s0") * 300 + b"N."
    return out + b"}X\x01\x00\x00\x00a" + top + b"s."


@pytest.mark.parametrize("form, depth", [("tuples", 18), ("lists", 18), ("key", 18), ("dropped keys", 14)])
def test_shared_objects_cannot_expand_exponentially(tmp_path, form, depth):
    """Hashing such a key or walking such a value takes time exponential in the file size (a 123-byte file took
    1.2 s, each 6 more bytes doubled it): the opcode scan refuses it before anything is built."""
    path = tmp_path / "m.pdparams"
    path.write_bytes(_laughs(depth, form))
    started = time.perf_counter()
    with pytest.raises(CorruptWeightsError, match=r"m\.pdparams: refused to load: by byte \d+ its shared objects "
                                                  r"expand to \d+ objects when followed as trees.*billion laughs"):
        load(path)
    assert time.perf_counter() - started < 0.5


def test_shared_objects_are_converted_once(tmp_path):
    from converter import _pickle_safe as ps

    shared = [ARRAYS["ids"], 1]
    blob = bytes(range(256)) * 4097  # over MAPPED_BYTES: left in the file, read only as a value
    path = _write_pickle(tmp_path / "m.pdparams", {"x": shared, "y": shared, "blobs": [blob, blob]})
    with open(path, "rb") as file:
        obj, _ = ps.load_pickle(file, path.stat().st_size, source=str(path), map_from=(file.fileno(), 0))
    assert obj["x"] is obj["y"] and obj["x"][0] is obj["y"][0]
    assert obj["blobs"][0] is obj["blobs"][1] and obj["blobs"][0] == blob
    # sharing as checkpoints do it stays well within the scan's bound: 5000 names for one array
    aliases = load(_write_pickle(tmp_path / "aliases.pdparams", {f"k{i}": ARRAYS["ids"] for i in range(5000)}))
    assert len(aliases) == 5000 and all(array is aliases["k0"] for array in aliases.values())


def _bytes_referenced(count: int, payload: int) -> bytes:
    """``{'a': [b, b, ...]}``: one BINBYTES payload of ``payload`` bytes, memoized, then referenced ``count`` times."""
    return (b"\x80\x04}\x94X\x01\x00\x00\x00a\x94B" + struct.pack("<I", payload) + bytes(payload) + b"\x940]("
            + b"h\x02" * count + b"es.")


@pytest.mark.parametrize("payload, count", [(64 << 10, 2000), ((1 << 20) + 16, 64)])  # read / mapped from the file
def test_one_bytes_value_referenced_many_times_is_refused(tmp_path, payload, count):
    """Each reference used to cost a copy of the bytes and a latin1 text of them (a 2 MiB file peaked at 838 MiB)."""
    path = tmp_path / "m.pdparams"
    path.write_bytes(_bytes_referenced(1, payload))
    assert load(path).meta["values"]["a"] == ["\0" * payload]
    path.write_bytes(_bytes_referenced(count, payload))
    tracemalloc.start()
    try:
        with pytest.raises(CorruptWeightsError, match=r"m\.pdparams: at 'a', the names and values of the state grow "
                                                      "past the file's size"):
            load(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * path.stat().st_size + (2 << 20), peak


def test_refusals_describe_large_shared_arguments_briefly(tmp_path):
    """A refused call's message shows the start of its arguments: a full repr of a 1 MiB text referenced 100 times
    took 100 MiB (and more references, more)."""
    text = b"X" + struct.pack("<I", 1 << 20) + b"a" * (1 << 20) + b"\x94"
    path = tmp_path / "m.pdparams"
    path.write_bytes(b"\x80\x04cbuiltins\neval\n(X\x01\x00\x00\x00x(" + text + b"h\x00" * 99 + b"ttR.")
    tracemalloc.start()
    try:
        with pytest.raises(UnsafeCheckpointError, match=r"only Paddle's eval.*got \('x', \('aaa.*\.\.\.$"):
            load(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * path.stat().st_size, peak


def test_array_shell_states(tmp_path):
    path = tmp_path / "m.pdparams"
    shell = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85C\x01b\x87R"
    state = b"(K\x01K\x01\x85cnumpy\ndtype\nX\x02\x00\x00\x00f4\x89\x88\x87R\x89C\x04\x00\x00\x80?t"
    path.write_bytes(b"\x80\x02" + shell + state + b"b" + state + b"b.")
    with pytest.raises(UnsafeCheckpointError, match="second BUILD on an array"):
        load(path)
    path.write_bytes(b"\x80\x02}X\x01\x00\x00\x00w" + shell + b"s.")
    with pytest.raises(CorruptWeightsError, match="never given its data"):
        load(path)
    path.write_bytes(b"\x80\x02}X\x01\x00\x00\x00w" + shell + state.replace(b"C\x04", b"C\x03")[:-5] + b"\x00\x80?tbs.")
    with pytest.raises(CorruptWeightsError, match=r"needs 4 bytes, the pickle holds 3"):
        load(path)


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_payloads_across_scan_windows(tmp_path, protocol):
    """Arrays of many sizes, some straddling the opcode scan windows (8 KiB), protocol 0 text lines included."""
    rs = np.random.RandomState(protocol)
    state = {f"w{i}": rs.standard_normal(n).astype(np.float32)
             for i, n in enumerate([1, 16383, 16384, 16385, 3, 40000, 7, 70000, 2, 5])}
    path = _write_pickle(tmp_path / "m.pdparams", state, protocol)
    weights = load(path)
    assert list(weights) == list(state) and all(_same(weights[k], state[k]) for k in state)


def test_corrupt_pickles(tmp_path):
    good = pickle.dumps({"w": np.zeros(1000, np.float32)}, protocol=4)
    path = tmp_path / "m.pdparams"
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(CorruptWeightsError, match=r"m\.pdparams.*(asks for|ended)"):
        load(path)
    # BINBYTES8 claiming a terabyte: refused before anything is allocated
    path.write_bytes(b"\x80\x04\x8e" + struct.pack("<Q", 1 << 40) + b"abc.")
    with pytest.raises(CorruptWeightsError, match="asks for 1099511627776 bytes"):
        load(path)
    # a small pickle expanding one memoized string many times is stopped by the size budget
    bomb = (b"\x80\x02X" + struct.pack("<I", 4096) + b"a" * 4096 + b"q\x00(" +
            b"c_codecs\nencode\nh\x00X\x06\x00\x00\x00latin1\x86R" * 400 + b"l.")
    path.write_bytes(bomb)
    with pytest.raises(CorruptWeightsError, match="more data than the file holds"):
        load(path)
    path.write_bytes(b"\x80\x04garbage")
    with pytest.raises(CorruptWeightsError, match="not a readable Paddle pickle"):
        load(path)


# ----------------------------------------------------------------------------- corrupt .pdiparams


def _first_tensor_layout(params: bytes) -> dict:
    desc_size = struct.unpack_from("<i", params, 16)[0]
    return {"desc_at": 20, "desc_size": desc_size, "data_at": 20 + desc_size}


def _variant(cls_dir: Path, tmp_path: Path, params: bytes, model: bytes | None = None) -> Path:
    for name in ("inference.pdiparams.info", "inference.pdmodel"):
        (tmp_path / name).write_bytes((cls_dir / name).read_bytes())
    if model is not None:
        (tmp_path / "inference.pdmodel").write_bytes(model)
    (tmp_path / "inference.pdiparams").write_bytes(params)
    return tmp_path / "inference"


def test_corrupt_pdiparams_errors(cls_dir, cls_weights, tmp_path):
    params = (cls_dir / "inference.pdiparams").read_bytes()
    first = cls_weights.program.params[0].name
    layout = _first_tensor_layout(params)
    desc = pb.parse_tensor_desc(memoryview(params)[layout["desc_at"]: layout["data_at"]])
    assert desc.data_type == 5 and params[:16] == bytes(16)

    def error(data: bytes, match: str, model: bytes | None = None) -> str:
        prefix = _variant(cls_dir, tmp_path, data, model)
        with pytest.raises(CorruptWeightsError, match=match) as excinfo:
            load(prefix)
        assert str(tmp_path / ("inference.pdmodel" if model else "inference.pdiparams")) in str(excinfo.value)
        return str(excinfo.value)

    def with_desc(data_type: int, dims: list[int]) -> bytes:
        body = bytes([0x08, data_type]) + b"".join(b"\x10" + _varint(d & ((1 << 64) - 1)) for d in dims)
        return params[:16] + struct.pack("<i", len(body)) + body + params[layout["data_at"]:]

    message = error(params[: len(params) - 10], "needs .* bytes")
    assert f"variable {cls_weights.program.params[-1].name!r}" in message
    message = error(params[:18], "asks for 4 bytes at byte 16")
    assert repr(first) in message and "byte 0" in message
    error(params[:16] + struct.pack("<i", 1 << 30) + params[20:], "TensorDesc size 1073741824 does not fit")
    error(params[:16] + struct.pack("<i", -5) + params[20:], "TensorDesc size -5")
    error(with_desc(5, [-1] + desc.dims[1:]), "negative dimension")
    error(with_desc(99, desc.dims), "unknown data type 99")
    error(with_desc(5, [desc.dims[0] * 1000] + desc.dims[1:]), "differs from the program")
    error(with_desc(6, desc.dims), "dtype float64 differs from the program's float32")
    error(b"\x01" + params[1:], "unsupported DenseTensor version 1")
    error(params[:4] + struct.pack("<Q", 1 << 40) + params[12:], "LoD levels")
    error(params + b"\0" * 7, "7 unread bytes")
    error(params, "not a Paddle ProgramDesc", model=b"\x0a\xff\xff\xff\x0f")


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def test_protobuf_reader_handles_packed_and_negative_fields():
    dims = [3, -1, 48]
    unpacked = b"\x08\x05" + b"".join(b"\x10" + _varint(d & ((1 << 64) - 1)) for d in dims)
    packed_body = b"".join(_varint(d & ((1 << 64) - 1)) for d in dims)
    packed = b"\x08\x05\x12" + _varint(len(packed_body)) + packed_body
    for data in (unpacked, packed):
        desc = pb.parse_tensor_desc(memoryview(data))
        assert desc.data_type == 5 and desc.dims == dims
    with pytest.raises(pb.ProtobufError, match="claims 100 bytes"):
        list(pb.iter_fields(memoryview(b"\x12\x64abc")))
    with pytest.raises(pb.ProtobufError, match="truncated varint"):
        list(pb.iter_fields(memoryview(b"\x08\xff")))


DENSE_TENSOR, RAW, FP32, BF16, FP8_E4M3FN, FP8_E5M2 = 7, 17, 5, 22, 32, 33  # VarType.Type in framework.proto


def _field(number: int, value: int | bytes) -> bytes:
    """One protobuf field: a varint (int) or a length-delimited payload (bytes)."""
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value & ((1 << 64) - 1))
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def _tensor_desc(data_type: int, dims: list[int]) -> bytes:
    return _field(1, data_type) + b"".join(_field(2, d) for d in dims)


def _program(variables: list[tuple[str, int, int | None, list[int]]]) -> bytes:
    """A ProgramDesc of one block (no operators) holding the persistable ``(name, var type, data type, dims)``."""
    block = _field(1, 0) + _field(2, -1)
    for name, var_type, data_type, dims in variables:
        type_desc = _field(1, var_type)
        if data_type is not None:  # VarType.dense_tensor: DenseTensorDesc.tensor
            type_desc += _field(3, _field(1, _tensor_desc(data_type, dims)))
        block += _field(3, _field(1, name.encode()) + _field(2, type_desc) + _field(3, 1))
    return _field(1, block)


def _tensor_stream(data_type: int, dims: list[int], data: bytes) -> bytes:
    """One tensor as save_combine writes it: version, no LoD levels, tensor version, TensorDesc, data."""
    desc = _tensor_desc(data_type, dims)
    return struct.pack("<IQIi", 0, 0, 0, len(desc)) + desc + data


def _tiny_inference(folder: Path) -> Path:
    """An inference model with one float32 parameter ``w`` = [1, 1]; returns its prefix."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "inference.pdmodel").write_bytes(_program([("w", DENSE_TENSOR, FP32, [2])]))
    (folder / "inference.pdiparams").write_bytes(_tensor_stream(FP32, [2], np.ones(2, np.float32).tobytes()))
    return folder / "inference"


def test_raw_program_variables_are_not_read(tmp_path):
    """Paddle's save_vars skips persistable RAW variables, so the .pdiparams holds no data for them."""
    prefix = _tiny_inference(tmp_path)
    (tmp_path / "inference.pdmodel").write_bytes(
        _program([("w", DENSE_TENSOR, FP32, [2]), ("raw_state", RAW, None, [])]))
    weights = load(prefix)
    assert list(weights) == ["w"] and weights["w"].tolist() == [1.0, 1.0]
    assert [spec.name for spec in weights.program.params] == ["w"]


@pytest.mark.parametrize("data_type, name", [(BF16, "BF16"), (FP8_E4M3FN, "FP8_E4M3FN"), (FP8_E5M2, "FP8_E5M2")])
def test_inference_tensors_numpy_cannot_hold_are_unsupported(tmp_path, data_type, name):
    """A valid BF16/FP8 model is not corrupt: it is refused as a format ocrconv cannot convert."""
    (tmp_path / "inference.pdmodel").write_bytes(_program([("w_low", DENSE_TENSOR, data_type, [3])]))
    (tmp_path / "inference.pdiparams").write_bytes(_tensor_stream(data_type, [3], bytes(6)))
    with pytest.raises(UnsupportedFormatError, match=rf"inference\.pdiparams: variable 'w_low' is stored as {name}"):
        load(tmp_path / "inference")


# ----------------------------------------------------------------------------- memory and isolation


def test_peak_memory_stays_near_the_file_size():
    row = "ch_PP-OCRv2_rec"  # full row: 19.8 MB checkpoint, 8.3 MB inference weights
    for tar, kind in ((fd.train_tar(row), "trained"), (fd.infer_tar(row), "inference")):
        tracemalloc.start()
        try:
            weights = load(tar)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        size = weights.meta["size"]
        assert weights.kind == kind and size > 5_000_000
        assert peak <= 1.2 * size, (kind, peak / size)  # the issue's ~1.2x; measured 1.02 / 1.04


def test_protocol2_array_texts_are_released(tmp_path):
    """Protocol 2 stores array data as latin1 text: the text is dropped once its bytes exist."""
    rs = np.random.RandomState(0)
    state = {f"w{i}": rs.standard_normal((64, 1024)).astype(np.float32) for i in range(12)}
    path = _write_pickle(tmp_path / "m.pdparams", state, 2)
    tracemalloc.start()
    try:
        weights = load(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert all(_same(weights[k], state[k]) for k in state)
    # on top of the arrays: decoding the last array's text (its UTF-8 bytes and the text, ~0.3x here); a text kept
    # per array would add 1x
    assert peak <= 1.35 * weights.nbytes < path.stat().st_size, peak / weights.nbytes
    # a pickle that feeds one released text to a second array is refused
    text = bytes(range(256)).decode("latin1") * 512
    path.write_bytes(pickle.dumps([_Reduce(codecs.encode, (text, "latin1")),
                                   _Reduce(codecs.encode, (text, "latin1"))], protocol=2))
    with pytest.raises(UnsafeCheckpointError, match="released array text"):
        load(path)


def test_reading_never_imports_paddle(tmp_path):
    script = ("import sys\nfrom converter.paddle_io import load\n"
              "for p in sys.argv[1:]:\n    load(p)\n"
              "assert not any(m == 'paddle' or m.startswith('paddle.') for m in sys.modules), 'paddle imported'\n"
              "print('ok')\n")
    targets = [str(fd.infer_tar("ch_ppocr_mobile_v2.0_cls")), str(fd.train_tar("ch_ppocr_mobile_v2.0_cls"))]
    out = subprocess.run([sys.executable, "-c", script, *targets], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# ----------------------------------------------------------------------------- exactness against Paddle


@pytest.fixture(scope="session")
def paddle():
    os.environ["FLAGS_enable_pir_api"] = "0"
    paddle = pytest.importorskip("paddle")
    return paddle


def _extract(tar: Path, dest: Path) -> Path:
    with tarfile.open(tar) as t:
        t.extractall(dest, filter="data")
    return dest


def _assert_inference_exact(paddle, prefix: Path, weights: PaddleWeights) -> int:
    layer = paddle.jit.load(str(prefix))
    # jit.load renames variables that clash with ones loaded earlier in the process: map them back
    renamed = layer._program_holder_dict["forward"]._suffix_varname_dict or {}
    by_var = {var: weights[key] for key, var in weights.param_names.items()}
    state = layer.state_dict()
    assert len(state) == len(by_var)
    for tensor in state.values():
        name = renamed.get(tensor.name, tensor.name)
        assert _same(tensor.numpy(), by_var[name]), name
    return len(state)


@pytest.mark.paddle
@pytest.mark.parametrize("row", ALL_ROWS)
def test_bit_identical_to_paddle(paddle, row, tmp_path):
    info = fd.row_info(row)
    weights = load(fd.infer_tar(row))
    folder = _extract(fd.infer_tar(row), tmp_path / "infer") / info["infer_dirname"]
    assert _assert_inference_exact(paddle, folder / "inference", weights) == len(weights)
    train_folder = _extract(fd.train_tar(row), tmp_path / "train") / info["train_dirname"]
    for filename in info["train_files"]:
        ours = load(fd.train_tar(row), prefer=filename)
        ref = paddle.load(str(train_folder / filename), return_numpy=True)
        if filename.endswith(".states"):  # training state: plain values, no arrays
            flat = {f"{k}.{i}": v for k, d in ref.items() if isinstance(d, dict) for i, v in d.items()}
            flat.update({k: v for k, v in ref.items() if not isinstance(v, dict)})
            assert ours.meta["values"] == flat and len(ours) == 0
            continue
        assert list(ref) == list(ours)
        for key, array in ref.items():
            assert _same(array, ours[key]), (filename, key)


@pytest.mark.paddle
@pytest.mark.real
@pytest.mark.parametrize("folder", sorted(REAL))
def test_real_models_bit_identical_to_paddle(paddle, real_models, folder):
    weights = load(real_models / folder)
    assert _assert_inference_exact(paddle, real_models / folder / "inference", weights) == REAL[folder][0]


@pytest.mark.paddle
@pytest.mark.parametrize("protocol", [2, 3, 4])
def test_paddle_save_forms(paddle, tmp_path, protocol):
    paddle.disable_static()
    paddle.seed(0)
    layer = paddle.nn.Sequential(paddle.nn.Conv2D(3, 4, 3), paddle.nn.BatchNorm2D(4), paddle.nn.LSTM(4, 8))
    state = layer.state_dict()
    path = tmp_path / "m.pdparams"
    paddle.save(state, str(path), protocol=protocol)
    ours, ref = load(path), paddle.load(str(path), return_numpy=True)
    assert list(ours) == list(ref) and all(_same(ours[k], ref[k]) for k in ref)
    assert ours.param_names == {k: v.name for k, v in state.items()}
    assert ours.meta["pickle_protocol"] == protocol
    # the optimizer state (.pdopt): moments plus the LR scheduler's plain values
    optimizer = paddle.optimizer.Adam(learning_rate=paddle.optimizer.lr.StepDecay(0.1, step_size=2),
                                      parameters=layer.parameters())
    layer[0](paddle.ones([1, 3, 5, 5])).mean().backward()
    optimizer.step()
    opt_path = tmp_path / "m.pdopt"
    paddle.save(optimizer.state_dict(), str(opt_path), protocol=protocol)
    ours, ref = load(opt_path), paddle.load(str(opt_path), return_numpy=True)
    ref_arrays = {k: v for k, v in ref.items() if isinstance(v, np.ndarray)}
    assert len(ref_arrays) > 4 and set(ours) == set(ref_arrays)
    assert all(_same(ours[k], v) for k, v in ref_arrays.items())
    assert ours.meta["values"]["LR_Scheduler.last_lr"] == ref["LR_Scheduler"]["last_lr"]
    # a nested object goes through _pickle_save: tensors become (name, ndarray) tuples
    nested = tmp_path / "nested.pdparams"
    paddle.save({"model": state, "epoch": 3}, str(nested), protocol=protocol)
    ours, ref = load(nested), paddle.load(str(nested), return_numpy=True)
    assert "tuple(name, ndarray)" in ours.meta["forms"] and ours.meta["values"]["epoch"] == 3
    for key, array in ref["model"].items():
        assert _same(ours[f"model.{key}"], array), key
        assert ours.param_names[f"model.{key}"] == state[key].name


@pytest.mark.paddle
def test_tensors_in_lists_and_tuples_match_paddle(paddle, tmp_path):
    paddle.disable_static()
    t1, t2 = paddle.to_tensor(np.arange(6, dtype=np.float32).reshape(2, 3)), paddle.to_tensor(np.arange(3))
    path = tmp_path / "m.pdparams"
    paddle.save({"a": [t1, t2], "b": (t1, 3), "c": [[t2, "x"]]}, str(path))
    expected = {}

    def walk(obj, prefix):
        if isinstance(obj, np.ndarray):
            expected[prefix] = obj
        elif isinstance(obj, (dict, list, tuple)):
            for key, value in (obj.items() if isinstance(obj, dict) else enumerate(obj)):
                walk(value, f"{prefix}.{key}" if prefix else str(key))

    walk(paddle.load(str(path), return_numpy=True), "")
    ours = load(path)
    assert list(ours) == list(expected) == ["a.0", "a.1", "b.0", "c.0.0"]
    assert all(_same(ours[key], array) for key, array in expected.items())
    assert ours.meta["values"] == {"b.1": 3, "c.0.1": "x"}
