"""The dual encoder: image tower (frozen trunk + trainable tail) and text head over cached
sentence embeddings. Training and distillation see only the tail and the head."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from .config import filled
from .encoders import ImageTower, ProjectionHead, TextHead, build_image_encoder, to_model_input
from .trajectory import ParamLayout


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cuda_rng_state(device):
    """The CUDA generator state of `device` as numpy (dropout on a GPU draws from it, not
    from the CPU generator), or None on other devices."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_rng_state(device).numpy()


def set_cuda_rng_state(state, device) -> None:
    """Restore a state from cuda_rng_state (nothing when there is none or no CUDA)."""
    device = torch.device(device)
    if state is not None and device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.as_tensor(state, dtype=torch.uint8), device)


def logit_scale(model_cfg: dict, inner_loop: bool = False) -> float:
    """1/T; the seed code's inner loop used log(1/T) instead (a switch, off by default)."""
    model_cfg = filled("model", model_cfg)
    scale = 1.0 / model_cfg["temperature"]
    if inner_loop and model_cfg["quirk_inner_log_scale"]:
        return math.log(scale)
    return scale


@dataclass
class DualEncoder:
    tower: ImageTower
    head: TextHead

    @property
    def tail(self):
        return self.tower.tail

    def layouts(self):
        """The recorded and matched parameters: those of the tail and the head that require
        grad (with trainable lora: the adapters' lora_A / lora_B only)."""
        return {"image": ParamLayout.of(self.tower.tail), "text": ParamLayout.of(self.head)}

    def to(self, device):
        self.tower.trunk.to(device)
        self.tower.tail.to(device)
        self.head.to(device)
        return self


def build_model(model_cfg: dict, text_dim: int, seed: int) -> DualEncoder:
    """A fresh student: pretrained image tower, text head initialised from `seed` (and, with
    trainable lora, LoRA A matrices from image_encoder.lora.seed, or `seed` when null; the B
    matrices are zero, so the image encoder starts as the pretrained one; with trainable
    heads, an image projection head as the tower's tail)."""
    model_cfg = filled("model", model_cfg)
    tower = build_image_encoder(model_cfg["image_encoder"], seed=seed)
    if model_cfg["image_encoder"]["trainable"] == "heads":
        tower.tail = _image_head(tower.num_features, model_cfg["head_dropout"], seed)
    torch.manual_seed(seed)
    head = TextHead(text_dim, tower.num_features, model_cfg["head_dropout"])
    return DualEncoder(tower, head)


IMAGE_HEAD_SEED = 7919   # offset of the image head's initialisation stream from the model seed


def _image_head(width: int, dropout: float, seed: int) -> ProjectionHead:
    """trainable heads (RepBlend): a projection head width -> width on the frozen encoder's
    pooled features, the text head's structure, drawn from its own stream of `seed` (the
    global generator is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + IMAGE_HEAD_SEED)
        return ProjectionHead(width, width, dropout)


class PixelBatches:
    """The trunk features of uint8 images when the trunk is the identity (`trainable: all` or
    `lora`): the images stay uint8 NHWC in host memory and each indexed batch is normalised
    into float NCHW on the device when it is used. Indexing gives the same tensors as the
    eager features, without holding the split as float32 (4x the bytes; 17.5 GB for
    Flickr30K's training split at 224 px) on the device."""

    def __init__(self, images: np.ndarray, mean, std, device):
        self.images, self.mean, self.std, self.device = images, mean, std, torch.device(device)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        if torch.is_tensor(index):
            index = index.cpu().numpy()
        chunk = self.images[index]
        return to_model_input(chunk, self.mean, self.std).to(self.device)


def real_features(tower: ImageTower, images: np.ndarray, device):
    """Features of a split's uint8 images for training and retrieval: computed once by the
    frozen trunk, or normalised per batch when there is no trunk to precompute."""
    if isinstance(tower.trunk, nn.Identity):
        return PixelBatches(images, tower.mean, tower.std, device)
    return trunk_features(tower, images, device)


# images per chunk of trunk_features: as many as hold this many pixels (256 at 64 px, 21 at
# 224 px), so that the trunk's activations stay near 0.5 GB whatever the resolution (a fixed
# 256 images at 224 px peaked at 3 GB above the job's baseline on Lite0)
TRUNK_CHUNK_PIXELS = 256 * 64 * 64


def map_chunks(fn, data, chunk: int, dtype=None) -> torch.Tensor:
    """torch.cat of fn(data[s:s + chunk]) over the chunks, filled into one tensor allocated at
    the first chunk (a list and a cat would hold the result twice), in that chunk's memory
    format (channels_last from NHWC input) and dtype, or `dtype`."""
    out = None
    for start in range(0, len(data), chunk):
        f = fn(data[start:start + chunk])
        if out is None:
            last = (f.dim() == 4 and not f.is_contiguous()
                    and f.is_contiguous(memory_format=torch.channels_last))
            out = torch.empty((len(data), *f.shape[1:]), dtype=dtype or f.dtype,
                              device=f.device, memory_format=torch.channels_last if last else
                              torch.contiguous_format)
        out[start:start + len(f)] = f
    return torch.zeros(0) if out is None else out


@torch.no_grad()
def trunk_features(tower: ImageTower, images, device, batch_size=None, normalized=False):
    """Trunk output for a stack of images (uint8 NHWC, or normalised float NCHW; an array or
    a lazy view of the prepared store, read chunk by chunk), in chunks of batch_size images
    (None: TRUNK_CHUNK_PIXELS' worth)."""
    if batch_size is None:
        h, w = (images.shape[1:3] if not normalized else images.shape[2:4])
        batch_size = max(1, TRUNK_CHUNK_PIXELS // max(1, int(h) * int(w)))

    def trunk(chunk):
        x = chunk if normalized else to_model_input(chunk, tower.mean, tower.std)
        return tower.trunk(torch.as_tensor(x).to(device)).float()
    return map_chunks(trunk, images, batch_size)


@torch.no_grad()
def embed_pairs(model: DualEncoder, img_feats, texts, batch_size=512, text_dtype=None):
    """L2-normalised joint-space features of trunk features and sentence embeddings (the
    text features stored as text_dtype when given: the coreset pool keeps them in float16)."""
    import torch.nn.functional as F

    model.tail.eval()
    model.head.eval()
    img = map_chunks(lambda f: F.normalize(model.tail(f).float(), dim=-1), img_feats,
                     batch_size)
    txt = map_chunks(lambda t: F.normalize(model.head(t).float(), dim=-1), texts, batch_size,
                     dtype=text_dtype)
    return img, txt


def retrieval(model: DualEncoder, img_feats, texts, txt2img) -> dict:
    from .metrics import recall

    img, txt = embed_pairs(model, img_feats, texts)
    return recall((img @ txt.t()).cpu().numpy(), np.asarray(txt2img))
