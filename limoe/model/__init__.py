"""The LIMoE model (torch): `config` (presets), `routing` (top-k router, capacity, Batch Priority
Routing, dropless plans), `moe` (the expert layer), `transformer` (the one tower), `losses`
(contrastive and the entropy regularisers), `stats` (parameters and FLOPs), `checkpoint` (the
safetensors file with its config and tokenizer).
"""
