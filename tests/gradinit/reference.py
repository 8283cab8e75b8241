"""An independent GradInit, written in the style of the published code (zhuchen03/gradinit).

It steps the real parameters in place and keeps, per parameter, the scalar Adam state of the official
RescaleAdam (alpha, init_norm, separate first moments, one second moment); the scale gradient is read
as <p.grad, p.data> * init_norm / ||p||. Only for comparing against lightning_nt.gradinit in the tests.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def reference_gradinit(
    net: nn.Module,
    batches,
    iterations: int,
    lr: float,
    eta: float,
    gamma: float,
    min_scale: float,
    algorithm: str = "sgd",
    grad_clip: float = 1.0,
) -> list[float]:
    params = list(net.parameters())
    lower = [0.0 if name.endswith("bias") else min_scale for name, _ in net.named_parameters()]
    state = [
        {
            "alpha": 1.0,
            "init_norm": p.norm().item(),
            "step": 0,
            "cons_step": 0,
            "exp_avg": 0.0,
            "cons_exp_avg": 0.0,
            "exp_avg_sq": 0.0,
        }
        for p in params
    ]

    def rescale_step(constraint: bool) -> None:
        beta1, beta2 = 0.9, 0.999
        for p, s, low in zip(params, state, lower):
            current = p.data.norm().item()
            if s["init_norm"] == 0 or current == 0:
                continue
            g = torch.sum(p.grad * p.data).item() * s["init_norm"] / current
            g = max(min(g, grad_clip), -grad_clip)
            if constraint:
                s["cons_step"] += 1
                s["cons_exp_avg"] = s["cons_exp_avg"] * beta1 + g * (1 - beta1)
                steps, avg = s["cons_step"], s["cons_exp_avg"]
            else:
                s["step"] += 1
                s["exp_avg"] = s["exp_avg"] * beta1 + g * (1 - beta1)
                steps, avg = s["step"], s["exp_avg"]
            s["exp_avg_sq"] = s["exp_avg_sq"] * beta2 + g * g * (1 - beta2)
            denominator = math.sqrt(s["exp_avg_sq"] / (1 - beta2 ** (s["cons_step"] + s["step"]))) + 1e-8
            s["alpha"] = max(s["alpha"] - lr / (1 - beta1**steps) * avg / denominator, low)
            p.data.mul_(s["alpha"] * s["init_norm"] / current)

    for _ in range(iterations):
        (x0, y0), (x1, y1) = next(batches), next(batches)
        loss = F.cross_entropy(net(torch.cat([x0, x1])), torch.cat([y0, y1]))
        grads = torch.autograd.grad(loss, params, create_graph=True)
        if algorithm == "adam":
            gnorm = sum(g.abs().sum() for g in grads)
        else:
            gnorm = sum(g.square().sum() for g in grads).sqrt()
        if gnorm.item() > gamma:
            net.zero_grad()
            gnorm.backward()
            rescale_step(constraint=True)
            continue
        if algorithm == "adam":
            steps = [eta * g.detach().sign() for g in grads]
        else:
            steps = [eta * g.detach() / gnorm.detach() for g in grads]
        x2, y2 = next(batches)
        originals = [p.data.clone() for p in params]
        with torch.no_grad():
            for p, s in zip(params, steps):
                p.sub_(s)
        net.zero_grad()
        (F.cross_entropy(net(torch.cat([x0, x2])), torch.cat([y0, y2])) / eta).backward()
        with torch.no_grad():
            for p, original in zip(params, originals):
                p.copy_(original)
        rescale_step(constraint=False)
    return [s["alpha"] for s in state]
