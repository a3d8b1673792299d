"""Device checks of the inference backends: what LIMOE_DEVICE asks for must exist, or the
service refuses to start, saying why; int8 graphs on CUDA are warned about."""

from __future__ import annotations

import logging

import onnxruntime as ort
import pytest
import torch
from servers import ROOT

from limoe.runtime.onnx_encoder import OnnxEncoders
from service.backends import DeviceError, FakeBackend, check_device, encoder_passes, load_manifest, open_onnx
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


@pytest.mark.parametrize("advice,explicit,want", [
    ({"encoder_passes": 1}, None, 1),  # an imported CLIP's advice is taken
    ({"encoder_passes": 1}, 3, 3),  # LIMOE_ENCODER_PASSES wins over it
    (None, None, 2),  # no advice: the setting's default
    ({"encoder_passes": 0}, None, 2), ({"encoder_passes": True}, None, 2), ({"encoder_passes": "1"}, None, 2),
])
def test_encoder_passes_follow_the_entrys_advice_unless_set(advice, explicit, want):
    manifest = FakeBackend().manifest
    if advice is not None:
        manifest.data["serving"] = advice
    settings = Settings(**({"encoder_passes": explicit} if explicit is not None else {}))
    assert encoder_passes(settings, manifest) == want


def test_an_imported_clip_advises_one_pass(tiny_clip):
    manifest = load_manifest(Settings(model=str(tiny_clip[1])))
    assert manifest.data["serving"] == {"encoder_passes": 1}
    assert encoder_passes(Settings(), manifest) == 1
