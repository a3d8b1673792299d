"""From checkpoint to store entry (torch): `exporter` (ONNX and TorchScript graphs, checks, the
manifest), `quantize` (static int8), `model_card`, `recover` (a checkpoint back from an entry's
graphs) and `torch_encoders` (a checkpoint's model as an encoder pair).
"""
