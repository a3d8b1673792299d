"""LIMoE Serve: the zero-shot image classification service (FastAPI). Torch-free on ONNX."""
