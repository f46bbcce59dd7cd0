"""AI-KD's WGAN-GP critic on logits, trained in closed form.

The critic is the paper's small MLP, D(x) = mean_o [FC2(LeakyReLU(Norm(FC1(x))))]_o, and it learns by
minimising (Eq. 6)

    L_D = E[D(z_student)] - E[D(z_superior)] + lambda E[(||grad_x D(x_hat)||_2 - 1)^2],
    x_hat = e z_superior + (1 - e) z_student,  e ~ U(0, 1) per sample.

Autograd computes the penalty's parameter gradient by differentiating twice (``create_graph=True``):
dozens of tiny kernels for a net of a few thousand weights, and a graph torch.compile cannot take. Here the
input gradient of the penalty and every parameter gradient of L_D are written out by hand, BatchNorm's batch
Jacobian included, so a critic step is a fixed, short list of tensor operations: one stacked pass over the
real, fake and interpolated logits, three small matmuls back, and one fused Adam update of one flat
parameter tensor. The tests compare every number with PyTorch's double-backward autograd in float64.

Notation of the derivation (one group of N rows, hidden width H; ``mean`` is over the normalised axis):
    a = x W1^T + b1,  a_hat = (a - mu) s,  s = (var + eps)^-1/2,  y = gamma a_hat + beta,
    h = LeakyReLU(y),  D = h w + c  with  w = r sum_o W2[o], c = r sum_o b2[o]  (r = 1/O for "mean", 1 for "sum").
The input gradient of sum_i D(x_i) (what autograd's penalty differentiates) is
    g_y = w * phi'(y),  g_hat = gamma g_y,  g_a = s (g_hat - mean g_hat - a_hat mean(g_hat a_hat)),  G = g_a W1,
where the bracket is BatchNorm's (or LayerNorm's) Jacobian applied to g_hat. phi' is piecewise constant, so its
derivative is zero almost everywhere and the backward pass does not go through it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from aikd.distributed import SINGLE_PROCESS, Strategy

Norm = Literal["batch", "layer", "none"]
NORM_EPS = 1e-5  # BatchNorm1d's and LayerNorm's default


def _project(grad: Tensor, normed: Tensor, scale: Tensor, dim: int) -> Tensor:
    """s (g - mean g - a_hat mean(g a_hat)): a normalisation layer's Jacobian applied to ``grad``.

    The same operator maps the output gradient of BatchNorm (``dim`` = the batch axis) or LayerNorm (the
    feature axis) to its input gradient; it is self-adjoint, which the backward pass below uses twice.
    """
    return scale * (grad - grad.mean(dim, keepdim=True) - normed * (grad * normed).mean(dim, keepdim=True))


@dataclass
class CriticStats:
    """One critic step's numbers, as tensors (reading them would wait for the device)."""

    loss: Tensor  # L_D
    gap: Tensor  # E[D(real)] - E[D(fake)]: the Wasserstein estimate
    gp: Tensor  # the gradient penalty, before its weight


class Critic(nn.Module):
    """The critic: FC(C->hidden) - Norm - LeakyReLU - FC(hidden->out) - mean (the paper's, with ``norm="batch"``).

    Its weights live in one flat tensor ``theta`` (so that Adam, a data-parallel all-reduce and a checkpoint
    each touch one tensor); ``weight1``, ... are fixed views into it. ``norm`` is the paper's BatchNorm in
    training mode (batch statistics, always: the critic never scores in eval mode, so no running statistics
    are kept), LayerNorm (WGAN-GP's advice: no cross-sample dependence in the critic) or none.
    Initialised as PyTorch initialises the same layers, drawing from the global generator in the same order.
    """

    def __init__(self, num_classes: int, hidden: int = 64, out_features: int = 32, negative_slope: float = 0.2,
                 reduce: Literal["mean", "sum"] = "mean", norm: Norm = "batch") -> None:
        super().__init__()
        if norm not in ("batch", "layer", "none"):
            raise ValueError(f"critic norm must be 'batch', 'layer' or 'none', got {norm!r}")
        self.num_classes, self.hidden, self.out_features = num_classes, hidden, out_features
        self.negative_slope, self.reduce, self.norm = negative_slope, reduce, norm
        first, second = nn.Linear(num_classes, hidden), nn.Linear(hidden, out_features)
        pieces = [first.weight, first.bias]
        if norm != "none":
            pieces += [torch.ones(hidden), torch.zeros(hidden)]  # BatchNorm1d's and LayerNorm's affine init
        pieces += [second.weight, second.bias]
        self.theta = nn.Parameter(torch.cat([p.detach().reshape(-1) for p in pieces]), requires_grad=False)
        self._make_views()

    def _make_views(self) -> None:
        shapes = [("weight1", (self.hidden, self.num_classes)), ("bias1", (self.hidden,))]
        if self.norm != "none":
            shapes += [("gamma", (self.hidden,)), ("beta", (self.hidden,))]
        shapes += [("weight2", (self.out_features, self.hidden)), ("bias2", (self.out_features,))]
        offset = 0
        for name, shape in shapes:
            size = int(torch.Size(shape).numel())
            object.__setattr__(self, name, self.theta.data[offset:offset + size].view(shape))
            offset += size

    def _apply(self, fn, recurse: bool = True):  # .to(device/dtype) replaces theta: the views must follow it
        super()._apply(fn, recurse)
        self._make_views()
        return self

    def __setstate__(self, state) -> None:  # copy.deepcopy and pickle: views of the new theta, not copies
        super().__setstate__(state)
        self._make_views()

    @property
    def _norm_dim(self) -> int:
        """The axis a group of rows (N, H) is normalised over: the batch for BatchNorm, the features for LayerNorm."""
        return 0 if self.norm == "batch" else 1

    @property
    def _out_scale(self) -> float:
        return 1.0 / self.out_features if self.reduce == "mean" else 1.0

    def _head(self) -> tuple[Tensor, Tensor]:
        """(w, c): the second layer and the mean over its outputs in one, D = h w + c."""
        r = self._out_scale
        return self.weight2.sum(0) * r, self.bias2.sum() * r

    def _hidden(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(a_hat, s, y) for rows x of shape (..., N, C), normalised per leading group."""
        a = x @ self.weight1.T + self.bias1
        if self.norm == "none":
            return a, a.new_ones(()), a
        dim = -2 if self.norm == "batch" else -1
        centred = a - a.mean(dim, keepdim=True)
        scale = (centred.square().mean(dim, keepdim=True) + NORM_EPS).rsqrt_()  # biased variance, as the layers
        normed = centred * scale
        return normed, scale, torch.addcmul(self.beta, normed, self.gamma)

    def forward(self, logits: Tensor) -> Tensor:
        """D(logits): one score per row (differentiable in the logits; the critic's own weights are constants)."""
        _, _, y = self._hidden(logits)
        w, c = self._head()
        return nn.functional.leaky_relu(y, self.negative_slope) @ w + c

    def loss_and_grad(self, real: Tensor, fake: Tensor, eps: Tensor, gp_weight: float) -> tuple[Tensor, CriticStats]:
        """L_D's gradient in ``theta``'s layout, and L_D with its parts, for interpolation weights ``eps`` (N, 1)."""
        n, slope = real.shape[0], self.negative_slope
        x = torch.stack((real, fake, torch.lerp(fake, real, eps)))  # (3, N, C): real, fake, x_hat
        normed, scale, y = self._hidden(x)
        h = nn.functional.leaky_relu(y, slope)
        slopes = torch.ops.aten.leaky_relu_backward(y.new_ones(()).expand_as(y), y, slope, False)  # phi'(y)
        w, _ = self._head()  # the bias c cancels in L_D
        h_mean = h.mean(1)  # (3, H)
        d_real, d_fake = h_mean[:2] @ w  # E[D] - c over the real and the fake rows

        # The penalty at x_hat: G = d sum_i D(x_hat_i) / d x_hat, per row.
        g_y = slopes[2] * w
        g_hat = g_y * self.gamma if self.norm != "none" else g_y
        g_a = g_hat if self.norm == "none" else _project(g_hat, normed[2], scale[2], self._norm_dim)
        grad_x = g_a @ self.weight1
        norms = torch.linalg.vector_norm(grad_x, dim=1)
        gp = (norms - 1).square().mean()
        loss = d_fake - d_real + gp_weight * gp

        # Backward. dL/dG, then back through G = g_a W1 and the normalisation's Jacobian.
        d_grad_x = grad_x * (gp_weight * 2 / n * (norms - 1) / norms).unsqueeze(1)
        d_weight1 = g_a.T @ d_grad_x
        d_g_a = d_grad_x @ self.weight1.T
        # The critic scores: dL/dD = +1/N for fake rows, -1/N for real ones (x_hat's scores do not enter L_D).
        d_y = slopes[:2] * (w / n)  # (2, N, H)
        d_y[0].neg_()
        d_w = h_mean[1] - h_mean[0]
        if self.norm == "none":
            d_g_y = d_g_a
            d_a = torch.cat((d_y, torch.zeros_like(d_g_a).unsqueeze(0)))  # x_hat's a only enters through phi'
            d_gamma = d_beta = None
        else:
            dim = self._norm_dim
            m2 = (g_hat * normed[2]).mean(dim, keepdim=True)
            d_g_hat = _project(d_g_a, normed[2], scale[2], dim)  # the Jacobian is self-adjoint
            qa = (d_g_a * normed[2]).mean(dim, keepdim=True)
            d_normed_x = -scale[2] * (d_g_a * m2 + g_hat * qa)  # through a_hat's two appearances in g_a
            d_scale_x = (d_g_a * g_a).sum(dim, keepdim=True) / scale[2]  # through g_a's factor s
            d_g_y = d_g_hat * self.gamma
            d_normed = torch.cat((d_y * self.gamma, d_normed_x.unsqueeze(0)))
            d_a = _project(d_normed, normed, scale, dim + 1)
            d_a[2] -= scale[2].square() * normed[2] * d_scale_x / normed.shape[dim + 1]
            d_gamma = (d_y * normed[:2]).sum((0, 1)) + (d_g_hat * g_y).sum(0)
            d_beta = d_y.sum((0, 1))
        d_w = d_w + (d_g_y * slopes[2]).sum(0)
        d_weight1 = torch.addmm(d_weight1, d_a.reshape(-1, d_a.shape[-1]).T, x.reshape(-1, x.shape[-1]))
        pieces = [d_weight1, d_a.sum((0, 1))]
        if d_gamma is not None:
            pieces += [d_gamma, d_beta]
        r = self._out_scale
        pieces += [(d_w * r).expand(self.out_features, -1), torch.zeros_like(self.bias2)]  # c cancels in L_D
        grad = torch.cat([p.reshape(-1) for p in pieces])
        return grad, CriticStats(loss, d_real - d_fake, gp)



def critic_optimizer(critic: Critic, lr: float, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Adam:
    """The critic's Adam: fused (one kernel for its one flat tensor), else PyTorch's default implementation."""
    try:
        return torch.optim.Adam([critic.theta], lr=lr, betas=betas, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
        return torch.optim.Adam([critic.theta], lr=lr, betas=betas)


def train_critic(critic: Critic, optimizer: torch.optim.Optimizer, superior_logits: Tensor, student_logits: Tensor,
                 steps: int = 1, gp_weight: float = 10.0, strategy: Strategy = SINGLE_PROCESS,
                 loss_and_grad: Callable[..., tuple[Tensor, CriticStats]] | None = None) -> CriticStats:
    """``steps`` Adam steps of the critic on L_D for one batch of detached logits; the last step's numbers.

    Each step draws its own interpolation weights e ~ U(0, 1) per sample, from the global generator (all
    of them at once: the same numbers as one draw per step). A step whose L_D is not finite (a diverged
    student) is skipped, so it cannot poison the critic; with a fused Adam the skip is decided on the
    device (GradScaler's ``found_inf``), so no step waits for the host. In a data-parallel run pass the
    run's ``strategy``: it averages the gradient over the ranks and makes them skip together.
    ``loss_and_grad`` replaces ``critic.loss_and_grad`` (a compiled copy of it).
    """
    loss_and_grad = loss_and_grad or critic.loss_and_grad
    dtype = critic.theta.dtype
    # The critic's own precision throughout: a caller's autocast would compute the penalty in bf16.
    with torch.autocast(superior_logits.device.type, enabled=False):
        real, fake = superior_logits.detach().to(dtype), student_logits.detach().to(dtype)
        eps = torch.rand(steps, real.shape[0], 1, dtype=dtype, device=real.device)
        fused = optimizer.defaults.get("fused", False)
        for step in range(steps):
            grad, stats = loss_and_grad(real, fake, eps[step], gp_weight)
            critic.theta.grad = grad
            strategy.average_gradients([critic.theta])
            skip = strategy.any_rank(~torch.isfinite(stats.loss))
            if fused:
                optimizer.found_inf = skip  # float32, as GradScaler passes it
                optimizer.step()
            elif not bool(skip):
                optimizer.step()
    return stats
