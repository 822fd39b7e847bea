"""The reference oracle: one distillation iteration computed the seed code's way.

The student is rebuilt every iteration (pretrained weights reloaded), its parameters replaced
by views of one flat vector rebound before every step (ReparamModule), the whole image encoder
run on the pixels at every inner step, the graph of all steps kept. It shares no code with
vldd.engines beyond the losses, so that the engines can be checked against it
(benchmarks/unroll.py, tests/test_engines.py).
"""
from __future__ import annotations

import torch


class FlatParams:
    """The seed code's ReparamModule, reduced to what it does in the unroll: a module's
    trainable parameters are deleted and replaced by views of one flat vector, rebound
    before every call."""

    def __init__(self, module, layout):
        self.layout, self.slots = layout, []
        for name in layout.names:
            owner, _, attr = name.rpartition(".")
            mod = module.get_submodule(owner) if owner else module
            del mod._parameters[attr]
            self.slots.append((mod, attr))

    def bind(self, flat):
        for (mod, attr), view in zip(self.slots, self.layout.unflatten(flat).values()):
            setattr(mod, attr, view)


def reference_meta_gradient(build_student, u, pixels, texts, lr_img, lr_txt):
    """The seed code's iteration, as a baseline: (loss, [d pixels, d texts, d lr_img, d lr_txt]).

    u: the vldd.engines.Unroll of the iteration, read for its data only (theta0, target,
    syn_steps, mini_batch, scale, gen), not its model: build_student() returns a fresh vldd
    DualEncoder (pretrained weights loaded again). The global torch generator is restored
    after the build, so that the dropout masks are those the vldd engines draw and the
    gradients can be compared.
    """
    from vldd.losses import contrastive_loss, matching_loss
    from vldd.train import train_mode

    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(pixels.device) if pixels.is_cuda else None
    student = build_student()
    torch.set_rng_state(rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state(cuda_rng, pixels.device)
    train_mode(student)
    layouts = student.layouts()
    encoder = torch.nn.Sequential(student.tower.trunk, student.tower.tail)  # the whole tower
    img_net = FlatParams(student.tower.tail, layouts["image"])
    txt_net = FlatParams(student.head, layouts["text"])
    th_i = u.theta0["image"].clone().requires_grad_(True)
    th_t = u.theta0["text"].clone().requires_grad_(True)
    for _ in range(u.syn_steps):
        idx = torch.randperm(len(texts), generator=u.gen)[:u.mini_batch].to(texts.device)
        img_net.bind(th_i)
        txt_net.bind(th_t)
        loss = contrastive_loss(encoder(pixels[idx]), student.head(texts[idx]), u.scale)
        g_i, g_t = torch.autograd.grad(loss, [th_i, th_t], create_graph=True, allow_unused=True)
        if g_i is not None:
            th_i = th_i - lr_img * g_i
        th_t = th_t - lr_txt * g_t
    loss = matching_loss({"image": th_i, "text": th_t}, u.theta0, u.target)
    inputs = [pixels, texts, lr_img, lr_txt]
    live = [t for t in inputs if t.requires_grad]
    got = iter(torch.autograd.grad(loss, live, allow_unused=True))
    return loss.detach(), [next(got) if t.requires_grad else None for t in inputs]
