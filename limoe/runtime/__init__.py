"""What serving and `limoe classify` stand on, torch-free: `model_store` (entries, manifests,
verification), `encoders` (the encoder-pair interface), `onnx_encoder` (ONNX Runtime), `preprocess`,
`tokenizer`, `zeroshot` (the classifier head), `templates` (prompts) and `routing_counts`.
"""
