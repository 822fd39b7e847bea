"""The one training loop: experts, evaluation on pair sets and full-data training."""
from __future__ import annotations

import logging

import numpy as np
import torch

from .errors import VlddError
from .losses import contrastive_loss, wbce_loss
from .model import DualEncoder
from .progress import Progress

log = logging.getLogger(__name__)


def train_mode(model: DualEncoder):
    """Dropout on, BatchNorm frozen on its running statistics (never batch statistics), so
    training follows the same function that the distillation unroll differentiates."""
    model.tail.train()
    model.head.train()
    for m in model.tail.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def train_contrastive(model: DualEncoder, img_feats, texts, pair_img, pair_txt, *, epochs,
                      lr_image, lr_text, momentum, weight_decay, batch_size, logit_scale, seed,
                      per_image=False, on_epoch_end=None, on_batch=None, checkpoint=None,
                      progress=None, targets=None):
    """SGD on the symmetric InfoNCE loss over (image, text) pairs; with `targets` (LoRS: an
    [n_pairs, n_pairs] similarity matrix) on the weighted BCE against its blocks instead.

    img_feats: trunk features [n_img, ...]; texts: sentence embeddings [n_txt, d];
    pair_img / pair_txt: LongTensor [n_pairs] indexing them. One epoch visits every pair once
    in a random order from `seed`; with per_image, an epoch visits every image once, each with
    one of its pairs drawn at random (an epoch of images rather than of captions).
    on_epoch_end(epoch, mean_loss) runs after each epoch (epoch counts from 1);
    on_batch(pair_ids, img_f, txt_f) sees each batch's features.

    checkpoint, when given, makes the loop resumable: checkpoint.restore(opt, gen) puts back
    the model, optimiser and random state of the last finished epoch and returns that epoch
    (0 when there is none); checkpoint.save(epoch, mean_loss, opt, gen) runs after each epoch
    (after on_epoch_end). A resumed run continues bit for bit as an uninterrupted one.
    progress, when given, names the run in a progress line per epoch (vldd.progress).
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout in the head
    opt = sgd_optimizer(model, lr_image, lr_text, momentum, weight_decay)
    pair_img = torch.as_tensor(pair_img)
    _check_pairs(pair_img, batch_size)
    first = 1 if checkpoint is None else checkpoint.restore(opt, gen) + 1
    bar = Progress(epochs, progress, unit="epoch", start=first - 1, log=log) if progress else None
    for epoch in range(first, epochs + 1):
        train_mode(model)
        order = _epoch_order(pair_img, gen, per_image)
        mean_loss = train_epoch(model, opt, order, img_feats, texts, pair_img, pair_txt,
                                batch_size, logit_scale, on_batch, targets)
        if not np.isfinite(mean_loss):
            raise VlddError(f"training diverged at epoch {epoch} (loss {mean_loss}); lower the "
                            f"learning rates (image {lr_image}, text {lr_text}).")
        if on_epoch_end is not None:
            on_epoch_end(epoch, mean_loss)
        if checkpoint is not None:
            checkpoint.save(epoch, mean_loss, opt, gen)
        if bar:
            bar.update(1, loss=mean_loss)
    model.tail.eval()
    model.head.eval()
    return model


def sgd_optimizer(model: DualEncoder, lr_image, lr_text, momentum, weight_decay):
    """SGD over the tail's trained parameters (when it has any) at lr_image and the head's
    at lr_text."""
    groups = []
    tail_params = [p for p in model.tail.parameters() if p.requires_grad]
    if tail_params:
        groups.append({"params": tail_params, "lr": lr_image})
    groups.append({"params": list(model.head.parameters()), "lr": lr_text})
    return torch.optim.SGD(groups, momentum=momentum, weight_decay=weight_decay)


def _check_pairs(pair_img: torch.Tensor, batch_size: int):
    """At least two images and a batch of at least two: InfoNCE needs a negative."""
    if len(torch.unique(pair_img)) < 2 or batch_size < 2:
        raise VlddError(f"too few training pairs ({len(torch.unique(pair_img))} image(s), batch "
                        f"size {batch_size}): the contrastive loss needs at least 2 images per "
                        "batch. Give the stage more training data (or a budget >= 2).")


def _epoch_order(pair_img: torch.Tensor, gen: torch.Generator, per_image: bool):
    """The pair ids one epoch visits, in order: every pair in a random order from `gen`, or
    with per_image the first pair of each image in that order, the images shuffled again."""
    order = torch.randperm(len(pair_img), generator=gen)
    if per_image:
        _, first = np.unique(pair_img[order].numpy(), return_index=True)
        chosen = order[torch.as_tensor(first)]
        order = chosen[torch.randperm(len(chosen), generator=gen)]
    return order


def train_epoch(model: DualEncoder, opt, order, img_feats, texts, pair_img, pair_txt,
                batch_size, logit_scale, on_batch, targets=None):
    """One SGD step per batch of `order`; the epoch's mean loss (nan when no batch ran)."""
    losses = []
    for start in range(0, len(order), batch_size):
        ids = order[start:start + batch_size]
        if len(ids) < 2:  # InfoNCE needs a negative
            continue
        img_f = model.tail(img_feats[pair_img[ids]])
        txt_f = model.head(texts[pair_txt[ids]])
        if targets is None:
            loss = contrastive_loss(img_f, txt_f, logit_scale)
        else:
            block = targets[ids.to(targets.device)][:, ids.to(targets.device)]
            loss = wbce_loss(img_f, txt_f, logit_scale, block)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
        if on_batch is not None:
            on_batch(ids, img_f.detach(), txt_f.detach())
    return float(torch.stack(losses).mean()) if losses else float("nan")
