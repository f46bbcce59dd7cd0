"""The critic as aikd trained it before the closed form: PyTorch modules and double-backward autograd.

This is the reference the closed-form critic (aikd.methods.critic) is tested against. It builds the same
network from ordinary layers (nn.Linear, nn.BatchNorm1d in training mode or nn.LayerNorm, nn.LeakyReLU)
with a Critic's weights, computes the WGAN-GP penalty with ``torch.autograd.grad(create_graph=True)``
and steps a plain torch.optim.Adam, as aikd <= 0.1 did.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from aikd.methods.critic import Critic


class ReferenceCritic(nn.Module):
    """FC - Norm - LeakyReLU - FC - mean over the outputs, from ordinary modules."""

    def __init__(self, critic: Critic) -> None:
        super().__init__()
        c = critic
        layers: list[nn.Module] = [nn.Linear(c.num_classes, c.hidden)]
        if c.norm == "batch":
            layers.append(nn.BatchNorm1d(c.hidden))
        elif c.norm == "layer":
            layers.append(nn.LayerNorm(c.hidden))
        layers += [nn.LeakyReLU(c.negative_slope), nn.Linear(c.hidden, c.out_features)]
        self.net = nn.Sequential(*layers).to(c.theta.dtype)
        self.reduce = c.reduce
        with torch.no_grad():
            self.net[0].weight.copy_(c.weight1)
            self.net[0].bias.copy_(c.bias1)
            if c.norm != "none":
                self.net[1].weight.copy_(c.gamma)
                self.net[1].bias.copy_(c.beta)
            self.net[-1].weight.copy_(c.weight2)
            self.net[-1].bias.copy_(c.bias2)

    def forward(self, x: Tensor) -> Tensor:
        scores = self.net(x)
        return scores.mean(1) if self.reduce == "mean" else scores.sum(1)

    def flat(self) -> Tensor:
        """The weights in Critic.theta's layout (Linear1, [norm affine], Linear2)."""
        return torch.cat([p.detach().reshape(-1) for p in self.parameters()])

    def flat_grad(self) -> Tensor:
        return torch.cat([p.grad.reshape(-1) for p in self.parameters()])


def gradient_penalty(critic: nn.Module, real: Tensor, fake: Tensor, eps: Tensor) -> Tensor:
    """E[(||grad_x D(x_hat)||_2 - 1)^2] by double backward, at x_hat = eps real + (1 - eps) fake."""
    x_hat = (eps * real + (1 - eps) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    return ((grad.norm(2, dim=1) - 1) ** 2).mean()


def critic_loss(critic: nn.Module, real: Tensor, fake: Tensor, eps: Tensor, gp_weight: float) -> tuple[Tensor, ...]:
    """(L_D, gap, gp), each critic call on its own batch (its own batch statistics), as before."""
    d_real, d_fake = critic(real).mean(), critic(fake).mean()
    gp = gradient_penalty(critic, real, fake, eps)
    return d_fake - d_real + gp_weight * gp, d_real - d_fake, gp


def reference_steps(critic: ReferenceCritic, real: Tensor, fake: Tensor, eps: Tensor, gp_weight: float, lr: float,
                    betas: tuple[float, float] = (0.9, 0.999)) -> list[tuple[Tensor, ...]]:
    """len(eps) Adam steps; each step's (L_D, gap, gp, gradient) before its update."""
    optimizer = torch.optim.Adam(critic.parameters(), lr=lr, betas=betas)
    out = []
    for e in eps:
        optimizer.zero_grad(set_to_none=True)
        loss, gap, gp = critic_loss(critic, real, fake, e, gp_weight)
        loss.backward()
        out.append((loss.detach(), gap.detach(), gp.detach(), critic.flat_grad().clone()))
        optimizer.step()
    return out
