"""LIMoE: the Language-Image Mixture of Experts.

Subpackages by role; arrows point down this list, never up (tests/test_layout.py):

- `limoe.cli`      the `limoe` command (train, export, eval, classify, ...; `serve` comes from the
                   service through the `limoe.commands` entry point).
- `limoe.bulk`     offline classification of folders and shards, alone or on Ray Data.   [torch-free]
- `limoe.eval`     zero-shot evaluation of checkpoints and store entries, and its held-out sets.
- `limoe.export`   checkpoint -> store entry: ONNX and TorchScript graphs, int8, model cards, recovery.
- `limoe.train`    the training loop and the weighted-mix dataset.
- `limoe.model`    the model: config, routing (top-k, capacity, BPR), MoE layer, transformer, losses.
- `limoe.data`     data sources, their on-disk format and readers for users' data.        [torch-free]
- `limoe.runtime`  what serving stands on: model store, encoder pairs (ONNX), preprocessing,
                   tokenizer, zero-shot head, prompt templates.                          [torch-free]

The torch-free subpackages never import torch at module level (tests/test_torch_free.py imports
every module of them, and all of `service/`, with torch blocked).
"""

__version__ = "0.1.0"
