"""ONNX export: ``torch.onnx.export`` (the TorchScript exporter) of every family, run by onnxruntime and held to the
parity rule against the PyTorch model on the parity inputs (batch, height and width dynamic).

The DB detectors' feature pyramids used to be written into views of a fresh tensor, which the exporter does not
follow: the exported det graphs had no input at all (the neck's output became a constant) and gave maps off by
up to 0.9. They now take plain operations whenever the inference fast path is off (tracing, exporting).
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

import fixture_data
from converter import paddle_io, parity, rules
from converter.convert import usage_facts
from converter.manifest import get_model

ort = pytest.importorskip("onnxruntime")

SERVER_ROWS = {"ch_PP-OCRv4_server_det", "ch_PP-OCRv4_server_rec", "ch_ppocr_server_v2.0_det",
               "ch_ppocr_server_v2.0_rec"}
ROWS = [pytest.param(row, marks=pytest.mark.slow) if row in SERVER_ROWS else row for row in fixture_data.all_rows()]


def _exported(model: torch.nn.Module, x: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    torch.onnx.export(model, (torch.from_numpy(x),), buffer, input_names=["x"], opset_version=17, dynamo=False,
                      dynamic_axes={"x": {0: "batch", 2: "height", 3: "width"}})
    return buffer.getvalue()


@pytest.mark.filterwarnings("ignore")  # the TorchScript exporter's deprecation and tracer warnings
@pytest.mark.parametrize("row", ROWS)
def test_exported_graph_matches_the_pytorch_model(row):
    family = get_model(row).family
    conversion = rules.convert(paddle_io.load(fixture_data.infer_tar(row)), family)
    model = conversion.model.eval()
    config = usage_facts(conversion.config)
    session = ort.InferenceSession(_exported(model, parity.parity_inputs(config)[0][1]),
                                   providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x"]  # the det graphs had none
    report = parity.run_parity(model, config, lambda x: session.run(None, {"x": x}))
    assert report.passed, report.table()
    assert len(report.data["cases"]) >= 3  # several shapes through one graph

