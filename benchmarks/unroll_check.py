"""The gradient check and the sensitivity of the unroll benchmark (benchmarks/unroll.py).

The check: the gradients of every engine at iteration 0 against exact; reference, exact and
checkpointed must agree within TOLERANCE. The sensitivity: how much the exact meta-gradient
moves under a random relative perturbation of theta_0 (and of the pixels), which says whether
the engines can agree at all at a setting (stable, rough or chaotic); where not, the search
for smaller student lrs and syn_steps that are stable.
"""
from __future__ import annotations

import torch

from harness import table_header
from unroll_problem import Setup

ENGINES = ["reference", "exact", "checkpointed", "constant-memory", "heads-only"]
EXACT_FAMILY = ["reference", "exact", "checkpointed"]
TOLERANCE = 1e-4
SENSITIVITY_EPS = 1e-6   # relative size of the perturbation of theta_0 / the pixels
STABLE_BELOW = 1e-3      # largest relative change of any gradient of a "stable" setting
CHAOTIC_FROM = 0.5       # a relative change from which (or a cosine below 0.9) it is "chaotic"
GRAD_NAMES = ["pixels", "texts", "lr_img", "lr_txt"]


def rel_err(a, b):
    if a is None or b is None:
        return None
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def cosine(a, b):
    if a is None or b is None:
        return None
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(),
                                                       b.double().flatten(), dim=0))


def fp32_opts(s):
    """The setup's engine options without autocast and TF32: the checks run in fp32."""
    return type(s.opts)(channels_last=s.opts.channels_last)


def gradient_check(args, problem, engines, setup=None):
    """Gradients of every engine at iteration 0, against exact: (rows, bad, exact), where bad
    lists the gradients on which the exact family disagrees by more than TOLERANCE and exact
    is exact's (loss, gradients) in fp32."""
    s = setup or Setup(args, problem)
    fp32 = fp32_opts(s)
    want = sorted(set(engines) | {"exact"}, key=ENGINES.index)
    grads, losses = {}, {}
    for e in want:
        loss, g = s.run(e, 0, args.syn_steps, opts=fp32)
        grads[e], losses[e] = [None if x is None else x.detach().cpu() for x in g], float(loss)
    rows = {}
    for e in want:
        rows[e] = {"loss": losses[e],
                   "rel_err": dict(zip(GRAD_NAMES, map(rel_err, grads[e], grads["exact"]))),
                   "cosine": dict(zip(GRAD_NAMES, map(cosine, grads[e], grads["exact"])))}
    if args.autocast != "none" or args.tf32:
        loss, g = s.run("exact", 0, args.syn_steps)
        g = [None if x is None else x.detach().cpu() for x in g]
        rows["exact+" + precision_label(args)] = {
            "loss": float(loss), "rel_err": dict(zip(GRAD_NAMES, map(rel_err, g, grads["exact"]))),
            "cosine": dict(zip(GRAD_NAMES, map(cosine, g, grads["exact"])))}
    bad = []
    for e in EXACT_FAMILY:
        for n, a, b in zip(GRAD_NAMES, grads.get(e, ()), grads["exact"]):
            if (a is None) != (b is None):
                bad.append((e, n, "gradient missing on one side"))
            elif a is not None and not rel_err(a, b) <= TOLERANCE:
                bad.append((e, n, rel_err(a, b)))
    return rows, bad, (losses["exact"], grads["exact"])


# ----------------------------------------------------------------------------- sensitivity


def _perturbed(t, eps, gen):
    """t + a random direction of relative L2 size eps (drawn in float64 on the CPU), and the
    size realised after rounding to t's dtype."""
    x = t.detach().double().cpu()
    u = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    y = (x + u * (eps * x.norm() / u.norm().clamp_min(1e-300))).to(t.dtype)
    realised = float((y.double() - x).norm() / x.norm().clamp_min(1e-300))
    return y.to(t.device), realised


def sensitivity(s, *, lr=None, syn_steps=None, eps=None, engine="exact",
                perturb=("theta0", "pixels"), base=None, seed=0, iteration=0):
    """How much the meta-gradient of `engine` (fp32; `iteration` gives the batches and dropout
    masks, 0: those of the check) moves when theta_0, and separately the pixels, move by a
    random relative eps.

    lr / syn_steps: the student lrs and the unroll length (default: the setup's); eps: default
    --sensitivity-eps (1e-6); base: the unperturbed (loss, gradients) when already computed at
    these settings. Returns a dict: loss; rows: per perturbation the realised relative size,
    the relative loss change and, per gradient, the relative L2 change and the cosine with the
    unperturbed gradient; and the verdict, from the theta_0 perturbation: max_rel_change (the
    largest relative change of the four gradients), min_cosine, stable (max_rel_change <
    STABLE_BELOW) and verdict (stable, rough or chaotic: verdict()). The theta_0 perturbation
    decides because it probes the unroll alone, which is what the engines compute differently
    (the frozen trunk they compute alike). Perturbing the pixels also crosses the kinks of the
    trunk (Lite0's ReLU6), on which the pixel gradient jumps (measured at syn_steps 1, where
    nothing is unrolled: a 1e-7 perturbation moved it by 2.3e-3, a 1e-6 one by 2.5e-3): that
    row is reported, not judged.
    """
    syn_steps = s.args.syn_steps if syn_steps is None else int(syn_steps)
    lr = s.args.lr if lr is None else float(lr)
    eps = getattr(s.args, "sensitivity_eps", SENSITIVITY_EPS) if eps is None else float(eps)
    saved = s.lr_img, s.lr_txt, s.theta0, s.pixels
    s.lr_img, s.lr_txt = (torch.tensor(lr, device=s.dev, dtype=x.dtype, requires_grad=True)
                          for x in saved[:2])
    opts = fp32_opts(s)

    def grads():
        loss, g = s.run(engine, iteration, syn_steps, opts=opts)
        return float(loss), [None if x is None else x.detach().cpu() for x in g]

    gen = torch.Generator().manual_seed(seed)
    out = {"engine": engine, "lr": lr, "syn_steps": syn_steps, "eps": eps,
           "iteration": iteration, "rows": {}}
    try:
        loss0, g0 = base if base is not None else grads()
        out["loss"] = loss0
        for what in perturb:
            realised = _perturb(s, what, saved, eps, gen)
            loss1, g1 = grads()
            s.theta0, s.pixels = saved[2], saved[3]
            out["rows"][what] = {
                "realised": realised, "loss": loss1,
                "loss_change": abs(loss1 - loss0) / max(abs(loss0), 1e-30),
                "rel_change": dict(zip(GRAD_NAMES, map(rel_err, g1, g0))),
                "cosine": dict(zip(GRAD_NAMES, map(cosine, g1, g0)))}
    finally:
        s.lr_img, s.lr_txt, s.theta0, s.pixels = saved
    return _judge(out)


def _perturb(s, what, saved, eps, gen):
    """Set s.theta0 (what: "theta0") or s.pixels to its saved value moved by a random relative
    eps; returns the relative size realised."""
    if what == "theta0":
        moved = {k: _perturbed(v, eps, gen) for k, v in saved[2].items()}
        s.theta0 = {k: v for k, (v, _) in moved.items()}
        return max(r for _, r in moved.values())
    if what == "pixels":
        px, realised = _perturbed(saved[3], eps, gen)
        s.pixels = px.requires_grad_(True)
        return realised
    raise ValueError(f"cannot perturb {what!r}: theta0 or pixels")


def _judge(out):
    """sensitivity()'s verdict: each row's largest change and smallest cosine, and those of
    the theta_0 row (or the only row) as the setting's."""
    for what, r in out["rows"].items():
        r["max_rel_change"] = max(v for v in r["rel_change"].values() if v is not None)
        r["min_cosine"] = min(v for v in r["cosine"].values() if v is not None)
    judge = out["rows"].get("theta0") or next(iter(out["rows"].values()))
    out["max_rel_change"], out["min_cosine"] = judge["max_rel_change"], judge["min_cosine"]
    out["stable"] = out["max_rel_change"] < STABLE_BELOW
    out["verdict"] = verdict(out["max_rel_change"], out["min_cosine"])
    return out


def verdict(max_rel_change, min_cosine):
    """stable: the engines can agree within TOLERANCE; rough: the gradient is defined only to
    about max_rel_change at float32 precision, but its direction holds; chaotic: it is not
    defined at all (O(1) changes, or a cosine below 0.9: a gradient or an lr's sign flips)."""
    if max_rel_change < STABLE_BELOW:
        return "stable"
    if max_rel_change < CHAOTIC_FROM and min_cosine >= 0.9:
        return "rough"
    return "chaotic"


def search_stable(s, args, lrs, steps):
    """The theta_0 sensitivity at each smaller student lr (at args.syn_steps) and each smaller
    syn_steps (at args.lr), largest first, stopping at the first stable one of each; returns
    (rows, the largest stable lr or None, the largest stable syn_steps or None). The smaller
    values are tried in turn rather than bisected: stability need not be monotone in the lr
    (at 32 px, last:1, 8 steps: stable at 0.05, not at 0.02 ... 0.002; benchmarks/README.md)."""
    by_lr, best_lr = _first_stable(s, "lr", sorted({x for x in lrs if x < args.lr}, reverse=True))
    by_steps, best_steps = _first_stable(
        s, "syn_steps", sorted({k for k in steps if 0 < k < args.syn_steps}, reverse=True))
    return by_lr + by_steps, best_lr, best_steps


def _first_stable(s, key, values):
    """The theta_0 sensitivity with `key` set to each value in turn, up to the first stable
    one: (rows, that value or None)."""
    rows = []
    for v in values:
        r = sensitivity(s, perturb=("theta0",), **{key: v})
        rows.append(r)
        print_search_row(r)
        if r["stable"]:
            return rows, v
    return rows, None


def precision_label(args):
    parts = ([args.autocast] if args.autocast != "none" else []) + (["tf32"] if args.tf32 else [])
    return "+".join(parts) or "fp32"


# ----------------------------------------------------------------------------- report


def fmt_err(v):
    return "n/a" if v is None else f"{v:.1e}"


def fmt_cos(v):
    return "n/a" if v is None else f"{v:+.3f}"


def print_check(rows, dtype="float32"):
    print(f"\nGradient check at iteration 0 vs exact ({dtype}; tolerance {TOLERANCE:g} relative L2 "
          "for reference and checkpointed)")
    table_header("engine", "loss", *(f"{n} rel.err (cos)" for n in GRAD_NAMES))
    for e, r in rows.items():
        cells = [f"{fmt_err(r['rel_err'][n])} ({fmt_cos(r['cosine'][n])})" for n in GRAD_NAMES]
        print(f"| {e} | {r['loss']:.6f} | " + " | ".join(cells) + " |")


def print_sensitivity(sens, dtype="float32"):
    print(f"\nSensitivity of the {sens['engine']} meta-gradient ({dtype}, iteration "
          f"{sens['iteration']}; lr "
          f"{sens['lr']:g}, syn_steps {sens['syn_steps']}; loss {sens['loss']:.6f}) to a random "
          f"relative {sens['eps']:g} perturbation: relative L2 change (cosine with the "
          f"unperturbed gradient). Stable when every change under the theta_0 perturbation is "
          f"below {STABLE_BELOW:g}; the pixels row is for information (it also crosses the "
          f"kinks of the frozen trunk, e.g. Lite0's ReLU6)")
    table_header("perturbed", "realised size", "loss change",
                 *(f"{n} change (cos)" for n in GRAD_NAMES))
    for what, r in sens["rows"].items():
        cells = [f"{fmt_err(r['rel_change'][n])} ({fmt_cos(r['cosine'][n])})" for n in GRAD_NAMES]
        print(f"| {'theta_0' if what == 'theta0' else what} | {r['realised']:.2e} | "
              f"{r['loss_change']:.1e} | " + " | ".join(cells) + " |")
    print(f"-> {sens['verdict'].upper()}: largest change "
          f"{sens['max_rel_change']:.1e} under the theta_0 perturbation, smallest cosine "
          f"{sens['min_cosine']:+.3f}")


SEARCH_HEADER = ("\nSearching a stable setting (each row: the exact gradient again after the "
                 "theta_0 perturbation)\n"
                 "| lr | syn_steps | loss | largest change | smallest cosine | verdict |\n"
                 "|---|---|---|---|---|---|")


def print_search_row(r):
    print(f"| {r['lr']:g} | {r['syn_steps']} | {r['loss']:.4f} | {r['max_rel_change']:.1e} | "
          f"{r['min_cosine']:+.3f} | {r['verdict']} |", flush=True)


def explain_failure(sens, bad, search, best_lr, best_steps, args):
    """The message of a failed check: an unstable setting (status 2) or a bug (status 1)."""
    diffs = ", ".join(f"{e} {n} {v if isinstance(v, str) else f'{v:.1e}'}" for e, n, v in bad)
    if sens["stable"]:
        print(f"\nFAILED: the exact engines disagree ({diffs}) although the setting is stable "
              f"(a {sens['eps']:g} perturbation of theta_0 moves the meta-gradient by at most "
              f"{sens['max_rel_change']:.1e}): a bug in an engine, not rounding.")
        return 1
    fixes = []
    if best_lr is not None:
        fixes.append(f"stable here at --lr {best_lr:g}")
    if best_steps is not None:
        fixes.append(f"stable here at --syn-steps {best_steps}")
    if not fixes:
        fixes.append("; ".join(f"lr {r['lr']:g}, syn_steps {r['syn_steps']}: "
                               f"{r['max_rel_change']:.1e}" for r in search)
                     + ": none stable" if search else "not searched")
    where = f"(--trainable {args.trainable}, lr {args.lr:g}, syn_steps {args.syn_steps})"
    change = (f"a {sens['eps']:g} perturbation of theta_0 changes the meta-gradient by up to "
              f"{sens['max_rel_change']:.1e} (relative L2; cosine down to "
              f"{sens['min_cosine']:+.3f})")
    if sens["verdict"] == "chaotic":
        print(f"\nFAILED: the engines disagree ({diffs}), and the inner loop is chaotic at this "
              f"setting {where}: {change}. The engines cannot agree and no engine's gradient is "
              f"meaningful; lower the student lr or syn_steps (" + "; ".join(fixes) + ").")
    else:
        print(f"\nFAILED: the engines disagree ({diffs}): the setting {where} is rough, not "
              f"chaotic: {change}. The gradient is defined only to about that much at float32 "
              "precision (the unroll amplifies rounding until units switch at kinks such as "
              "Lite0's ReLU6), so the "
              f"engines cannot agree within {TOLERANCE:g}, but its direction holds. For the "
              "check, lower the student lr or syn_steps (" + "; ".join(fixes) + ").")
    one = [r for r in search if r["syn_steps"] == 1 and not r["stable"]]
    if one:
        print(f"Not even one inner step is stable here ({one[0]['max_rel_change']:.1e} at "
              f"syn_steps 1, lr {one[0]['lr']:g}): the gradient of the network itself is rough "
              "at float32 precision (kinks such as Lite0's ReLU6 are crossed by rounding-sized "
              "changes), "
              "not only the unroll; train fewer layers (--trainable last:K).")
    return 2


def _numbers(text, kind):
    return [] if text.strip() in ("", "none") else [kind(x) for x in text.split(",")]


def run_check(args, problem, engines):
    """The gradient check, and the sensitivity (when it fails or with --sensitivity) with the
    search for a stable setting; returns (payload for the results, bad, sensitivity)."""
    setup = Setup(args, problem, dtype=getattr(torch, args.check_dtype))
    rows, bad, exact = gradient_check(args, problem, engines, setup)
    print_check(rows, args.check_dtype)
    sens, search, best_lr, best_steps = None, [], None, None
    if bad or args.sensitivity:
        sens = sensitivity(setup, base=exact)
        print_sensitivity(sens, args.check_dtype)
        lrs, steps = _numbers(args.search_lrs, float), _numbers(args.search_steps, int)
        if not sens["stable"] and (lrs or steps):
            print(SEARCH_HEADER, flush=True)
            search, best_lr, best_steps = search_stable(setup, args, lrs, steps)
    payload = {"gradient_check": rows, "sensitivity": sens, "stability_search": search,
               "largest_stable_lr": best_lr, "largest_stable_syn_steps": best_steps}
    return payload, bad, sens
