"""Zero-shot classifier: class names x prompt templates -> a (P, C) matrix of class embeddings.

open_clip's recipe: embed every template for a class, L2-normalise each, average them, and
normalise the average again. Torch-free (numpy): the server builds label sets with the same
code, feeding it its ONNX text encoder; training code passes a torch-backed `encode_text`.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from limoe.runtime.tokenizer import Tokenizer

EncodeText = Callable[[np.ndarray], np.ndarray]  # (N, L) int64 ids -> (N, P) float embeddings


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def fill_templates(classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Prompts in class-major order: class 0 x every template, then class 1, ..."""
    if not classnames or not templates:
        raise ValueError("need at least one class name and one template")
    for t in templates:
        if t.count("{}") != 1:
            raise ValueError(f"template {t!r} must contain exactly one '{{}}'")
    return [t.replace("{}", c) for c in classnames for t in templates]


def ensemble(prompt_embeddings: np.ndarray) -> np.ndarray:
    """(C, M, P) embeddings of C classes x M templates -> (P, C): normalise, mean, renormalise."""
    per_template = l2_normalize(prompt_embeddings.astype(np.float32), axis=-1)
    return l2_normalize(per_template.mean(axis=1), axis=-1).T


def build_zero_shot_classifier(encode_text: EncodeText, tokenizer: Tokenizer,
                               classnames: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """(P, C) class-embedding matrix; scores are `image_embeddings @ W`."""
    prompts = fill_templates(classnames, templates)
    emb = np.asarray(encode_text(tokenizer.encode(prompts)), dtype=np.float32)  # (C*M, P)
    return ensemble(emb.reshape(len(classnames), len(templates), -1))


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    z = logits - logits.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def zero_shot_scores(image_embeddings: np.ndarray, classes: np.ndarray, logit_scale: float) -> np.ndarray:
    """Softmax over the labels of `logit_scale` x cosine similarity: (P,) or (N, P) L2-normalised
    image embeddings and the (P, C) class matrix -> (C,) or (N, C). The server (service/engine.py)
    and the offline classifier (limoe/bulk/classify.py) both score with this, so they agree."""
    return softmax(logit_scale * (image_embeddings @ classes))
