"""In-house N Attack (Li et al., ICML 2019): score-based black-box attack by NES."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from esq_lightning.attacks.utils import as_autograd_input, canonical_norm, frozen_eval

__all__ = ["nattack"]


def _project(delta: Tensor, eps: float, norm: str) -> Tensor:
    """Project a batch of perturbations (n, d) onto the eps-ball."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    factor = (eps / delta.norm(dim=1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)
    return delta * factor


def _loss(logits: Tensor, y: Tensor) -> Tensor:
    # The reference code's loss on probabilities: clip(log p_y - max_{j!=y} log p_j, 0, 1000).
    logp = logits.log_softmax(dim=1)
    real = logp.gather(1, y[:, None]).squeeze(1)
    other = logp.scatter(1, y[:, None], float("-inf")).amax(dim=1)
    return (real - other).clamp(0.0, 1000.0)


def nattack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    norm: str = "l2",
    max_iter: int = 500,
    population: int = 300,
    sigma: float = 0.1,
    lr: float = 0.02,
    generator: torch.Generator | None = None,
    chunk_size: int = 8192,
) -> tuple[Tensor, Tensor]:
    """Budgeted, untargeted N Attack; returns (x_adv, queries per sample).

    Follows the reference implementation (Li et al. 2019, github.com/Cold-Winter/Nattack): a
    Gaussian N(mu, sigma^2) over the arctanh-space perturbation, candidates
    x + proj_eps(0.5 tanh(arctanh(2x - 1) + mu + sigma n) + 0.5 - x), NES update of mu with
    standardised rewards -0.5 * clip(log p_y - max_other log p, 0, 1000), step lr / (npop sigma).
    Two deliberate differences, both sound for a budgeted attack: every candidate of the population
    (already queried) is checked, not only the mean every 10th iteration, and the mean is checked
    every iteration; and the projection is around x itself rather than around tanh(arctanh(x)),
    so the budget holds exactly. A sample stops when an adversarial candidate is found. Only
    output scores are used: the model is queried under torch.no_grad().
    """
    norm = canonical_norm(norm)
    x = as_autograd_input(x)
    y = as_autograd_input(y)
    n, shape, d = x.shape[0], x.shape[1:], x[0].numel()
    gen_device = generator.device if generator is not None else x.device

    def randn(*size: int) -> Tensor:
        return torch.randn(size, generator=generator, device=gen_device, dtype=x.dtype).to(x.device)

    def query(points: Tensor) -> Tensor:
        return torch.cat([model(c.view(-1, *shape)) for c in points.split(chunk_size)])

    x_flat = x.flatten(1)
    x_adv = x_flat.clone()
    queries = torch.zeros(n, dtype=torch.long, device=x.device)
    with torch.no_grad(), frozen_eval(model):
        # 0.999999 keeps arctanh finite at 0 and 1, as in the reference code.
        w = torch.atanh((2 * x_flat - 1) * 0.999999)
        mu = randn(n, d) * 0.001
        queries += 1
        active = (query(x_flat).argmax(dim=1) == y).nonzero().squeeze(1)
        for _ in range(max_iter):
            if active.numel() == 0:
                break
            xa, ya, wa = x_flat[active], y[active], w[active]
            # The current mean: the reference code's real_input.
            mean_point = xa + _project(0.5 * torch.tanh(wa + mu[active]) + 0.5 - xa, eps, norm)
            noise = randn(active.numel(), population, d)
            cand = 0.5 * torch.tanh(wa[:, None] + mu[active][:, None] + sigma * noise) + 0.5
            cand = xa[:, None] + _project((cand - xa[:, None]).view(-1, d), eps, norm).view_as(cand)
            logits = query(torch.cat([mean_point[:, None], cand], dim=1).view(-1, d))
            logits = logits.view(active.numel(), population + 1, -1)
            queries[active] += population + 1
            y_rep = ya[:, None].expand(-1, population + 1)
            fooled = logits.argmax(dim=2) != y_rep
            done = fooled.any(dim=1)
            if done.any():
                first = fooled.float().argmax(dim=1)
                points = torch.cat([mean_point[:, None], cand], dim=1)
                x_adv[active[done]] = points[done, first[done]]
            keep = ~done
            x_adv[active[keep]] = mean_point[keep]
            loss = _loss(logits[:, 1:].reshape(-1, logits.shape[-1]), y_rep[:, 1:].reshape(-1))
            reward = -0.5 * loss.view(active.numel(), population)
            adv_weight = (reward - reward.mean(dim=1, keepdim=True)) / (
                reward.std(dim=1, unbiased=False, keepdim=True) + 1e-7
            )
            step = (lr / (population * sigma)) * torch.einsum("bp,bpd->bd", adv_weight, noise)
            mu[active] += step
            active = active[keep]
    return x_adv.view_as(x).clamp(0.0, 1.0), queries
