"""Encoders: timm image towers, frozen text towers, the trainable text head.

- weights: weight sources (hub, package:NAME, file:PATH, none) and reading them offline
- image:   the image tower (build_image_encoder) and its pixel normalisation
- split:   the image encoder's frozen trunk and trained tail (trainable all | none | last:K |
           lora | heads), per timm family
- lora:    LoRA adapters (peft) on the frozen image encoder, the TMLR version's LoRA matching
- text:    frozen text towers, their sentence embeddings (embed_texts) and TextHead
           (a ProjectionHead, also the image head of trainable heads)

The names below are what the rest of vldd, its tests and benchmarks import.
"""
from ..config import lora_spec, text_spec
from .image import ImageTower, build_image_encoder, image_normalisation, to_model_input
from .lora import is_lora_param
from .text import ProjectionHead, TextHead, build_text_encoder, embed_texts

__all__ = ["ImageTower", "ProjectionHead", "TextHead", "build_image_encoder", "build_text_encoder", "embed_texts",
           "image_normalisation", "is_lora_param", "lora_spec", "text_spec", "to_model_input"]
