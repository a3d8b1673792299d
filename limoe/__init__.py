"""LIMoE: the Language-Image Mixture of Experts.

Torch-free modules (safe for the ONNX server): config, tokenizer, preprocess, zeroshot,
templates. Torch modules: routing, moe, model, losses, checkpoint, stats.
"""

__version__ = "0.1.0"
