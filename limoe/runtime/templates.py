"""Prompt templates for zero-shot classification (data only). "{}" is replaced by the label."""

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "{}",
    "a picture of {}.",
    "an image of {}.",
    "a photo of {}.",
    "an emoji of {}.",
    "an icon of {}.",
    "a drawing of {}.",
    "a small picture of {}.",
)

SINGLE_TEMPLATE: tuple[str, ...] = ("{}",)
