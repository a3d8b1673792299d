"""int8 ONNX graphs whose answer for an item depends on that item only.

ONNX Runtime's dynamic quantisation (`quantize_dynamic`) computes each activation's int8 scale
from the whole batch at run time (DynamicQuantizeLinear), so an image's embedding moves by up to
1e-2 with its batch neighbours. The schemes here fix every scale ahead of time:

    "static"       QDQ graph: weights int8 per output channel, activations uint8 with scales
                   calibrated once on real inputs (MinMax); every MatMul/Gemm. The default.
    "weight_only"  MatMulNBits with 8-bit blocks of 32 weights; activations stay fp32.
    "dynamic"      ONNX Runtime's dynamic quantisation: batch-DEPENDENT, kept only so that
                   `bench/quantization.py` can show what the others fix. Never exported.

Calibration inputs come from the training sources (`limoe export --calibration-data`), or
synthetic ones when no data is at hand (recorded in the manifest either way).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

SCHEMES = ("static", "weight_only", "dynamic")
EXPORT_SCHEMES = ("static", "weight_only")  # the batch-independent ones
DEFAULT_SCHEME = "static"
DESCRIPTIONS = {
    "static": "static QDQ int8: per-channel int8 weights, uint8 activations with calibrated (fixed) scales",
    "weight_only": "weight-only int8 (MatMulNBits, blocks of 32), fp32 activations",
    "dynamic": "dynamic int8 (per-batch activation scales; batch-dependent)",
}


@contextmanager
def _quiet():
    """The quantisers' shape inference warns about every int64/bool tensor it skips."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


class _Feeds:
    """onnxruntime.quantization.CalibrationDataReader over a list of {input name: array} feeds."""

    def __init__(self, feeds: Iterable[dict[str, np.ndarray]]):
        self._it = iter(list(feeds))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def quantize(src: Path, dst: Path, scheme: str = DEFAULT_SCHEME,
             calibration: Sequence[dict[str, np.ndarray]] = ()) -> None:
    """Write an int8 version of the fp32 graph `src` to `dst` by `scheme` (see the module doc).
    "static" needs `calibration`: a few batches of real inputs, {input name: array}."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    if scheme not in SCHEMES:
        raise ValueError(f"int8 scheme must be one of {', '.join(SCHEMES)}, not {scheme!r}")
    with _quiet():
        if scheme == "static":
            if not calibration:
                raise ValueError("static int8 quantisation needs calibration inputs")
            quantize_static(str(src), str(dst), _Feeds(calibration), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            op_types_to_quantize=["MatMul", "Gemm"], calibrate_method=CalibrationMethod.MinMax)
        elif scheme == "weight_only":
            import onnx
            from onnxruntime.quantization.matmul_nbits_quantizer import (
                DefaultWeightOnlyQuantConfig,
                MatMulNBitsQuantizer,
            )

            config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, bits=8)
            quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), algo_config=config)
            quantizer.process()
            quantizer.model.save_model_to_file(str(dst), False)
        else:
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)


def freeze_dynamic_int8(src: Path, dst: Path, calibration: Sequence[dict[str, np.ndarray]]) -> int:
    """Give a dynamic int8 graph fixed activation scales, for entries whose fp32 graphs and
    checkpoint are gone (the int8 weights are kept as they are).

    Every DynamicQuantizeLinear(x) -> (y, y_scale, y_zero_point) becomes QuantizeLinear(x) with
    the scale and zero point that DynamicQuantizeLinear computes for the whole range of x over
    the calibration inputs: scale = (max(0, hi) - min(0, lo)) / 255, zero point
    round(-min(0, lo) / scale). Returns how many nodes were frozen."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))  # with its external weights
    nodes = [n for n in model.graph.node if n.op_type == "DynamicQuantizeLinear"]
    if not nodes:
        if src != dst:
            onnx.save_model(model, str(dst))
        return 0
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    for n in nodes:
        if n.input[0] not in present:
            probe.graph.output.append(helper.make_empty_tensor_value_info(n.input[0]))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep the probed tensors
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [n.input[0] for n in nodes]
    lo = {k: 0.0 for k in names}
    hi = {k: 0.0 for k in names}
    for feed in calibration:
        for k, v in zip(names, session.run(names, feed)):
            lo[k], hi[k] = min(lo[k], float(v.min())), max(hi[k], float(v.max()))
    replaced = []
    for n in model.graph.node:
        if n.op_type != "DynamicQuantizeLinear":
            replaced.append(n)
            continue
        x, (y, y_scale, y_zero) = n.input[0], n.output
        scale = np.float32((hi[x] - lo[x]) / 255.0 or 1.0)
        zero = np.uint8(np.clip(np.round(-lo[x] / scale), 0, 255))
        model.graph.initializer.extend([numpy_helper.from_array(np.array(scale), y_scale),
                                        numpy_helper.from_array(np.array(zero), y_zero)])
        replaced.append(helper.make_node("QuantizeLinear", [x, y_scale, y_zero], [y], name=f"{n.name}_frozen"))
    del model.graph.node[:]
    model.graph.node.extend(replaced)
    onnx.checker.check_model(model)
    onnx.save_model(model, str(dst))
    return len(nodes)


def batches(array: np.ndarray, size: int) -> list[np.ndarray]:
    """Split calibration inputs (N, ...) into batches of at most `size`."""
    return [array[i:i + size] for i in range(0, len(array), size)]


__all__ = ["DEFAULT_SCHEME", "DESCRIPTIONS", "EXPORT_SCHEMES", "SCHEMES", "batches", "freeze_dynamic_int8", "quantize"]
