"""Device checks of the inference backends: what LIMOE_DEVICE asks for must exist, or the
service refuses to start, saying why; int8 graphs on CUDA are warned about."""

from __future__ import annotations

import logging

import onnxruntime as ort
import pytest
import torch
from servers import ROOT

from limoe.runtime.onnx_encoder import OnnxEncoders
from service.backends import DeviceError, check_device, load_manifest, open_onnx
from service.settings import Settings

STORE = str(ROOT / "model_store")
ORT_HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.parametrize("device", ["cpu", "auto"])
@pytest.mark.parametrize("backend", ["onnx", "torchscript"])
def test_cpu_and_auto_always_pass(device, backend):
    check_device(Settings(model_store=STORE, device=device, backend=backend))


@pytest.mark.skipif(ORT_HAS_CUDA, reason="this onnxruntime has a CUDA provider")
def test_cuda_without_the_onnxruntime_cuda_provider_is_refused():
    with pytest.raises(DeviceError, match=r"LIMOE_DEVICE=cuda:0, but this onnxruntime has no CUDA provider "
                                          r"\(it has .*CPUExecutionProvider.*\): install onnxruntime-gpu"):
        check_device(Settings(model_store=STORE, device="cuda:0"))


def test_torchscript_cuda_index_beyond_the_devices_is_refused():
    index = torch.cuda.device_count()  # one past the last device (0 on a CPU-only machine)
    with pytest.raises(DeviceError, match=rf"LIMOE_DEVICE=cuda:{index}, but torch sees {index} CUDA device"):
        check_device(Settings(model_store=STORE, device=f"cuda:{index}", backend="torchscript"))


def test_int8_graphs_on_cuda_are_warned_about(monkeypatch, caplog):
    """ONNX Runtime has no CUDA int8 matmul kernels for our int8 graphs: say so. The
    session's provider list is the neighbour faked here (no GPU on CI)."""
    monkeypatch.setattr(OnnxEncoders, "providers", property(lambda self: ["CUDAExecutionProvider",
                                                                          "CPUExecutionProvider"]))
    manifest = load_manifest(Settings(model_store=STORE))  # the shipped default: int8 graphs only
    with caplog.at_level(logging.WARNING, logger="limoe.service"):
        backend = open_onnx(manifest, device="auto")
    assert backend.device == "CUDAExecutionProvider (int8)"
    assert any("runs its int8 graphs" in r.message and "--formats onnx" in r.message for r in caplog.records)


def test_fp32_graphs_on_cuda_are_not_warned_about(monkeypatch, caplog):
    monkeypatch.setattr(OnnxEncoders, "providers", property(lambda self: ["CUDAExecutionProvider",
                                                                          "CPUExecutionProvider"]))
    manifest = load_manifest(Settings(model_store=STORE, model="limoe-tiny"))
    with caplog.at_level(logging.WARNING, logger="limoe.service"):
        open_onnx(manifest, device="auto", quantized=False)
    assert not [r for r in caplog.records if "int8" in r.message]
