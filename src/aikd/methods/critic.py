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

That autograd path ships too, as the general one: :func:`train_critic` trains any ``nn.Module`` critic (scores
of shape (N,) or (N, 1) for logits (N, C)) by :func:`critic_loss` (the penalty by ``torch.autograd.grad`` with
``create_graph=True``) and an ordinary ``torch.optim.Adam`` step, and takes the closed form only for a
:class:`Critic`, whose architecture the derivation below is of (:func:`has_closed_form`). A critic of another
architecture (:class:`LayeredCritic` is the paper's from ordinary layers, a starting point) needs no derivation;
docs/methods/aikd.md says when the closed form is worth extending instead.

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
from functools import partial
from typing import Literal

import torch
from torch import Tensor, nn

from aikd.compiling import compiled_or_eager
from aikd.methods.base import Part
from aikd.strategy import SINGLE_PROCESS, Strategy

Norm = Literal["batch", "layer", "none"]
NORM_EPS = 1e-5  # BatchNorm1d's and LayerNorm's default


def _project(grad: Tensor, normed: Tensor, scale: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """s (g - mean g - a_hat mean(g a_hat)): a normalisation layer's Jacobian applied to ``grad``, and sum(g a_hat).

    The same operator maps the output gradient of BatchNorm (``dim`` = the batch axis) or LayerNorm (the
    feature axis) to its input gradient; it is self-adjoint, which the backward pass below uses twice.
    """
    k = grad.shape[dim]
    along = (grad * normed).sum(dim, keepdim=True)
    out = torch.sub(grad, grad.sum(dim, keepdim=True), alpha=1 / k).addcmul_(normed, along, value=-1 / k)
    return out.mul_(scale), along


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

    def __init_subclass__(cls, **kwargs) -> None:
        """Refuse a subclass that changes the function (``forward``) but not its derivatives (``loss_and_grad``): it
        would score the student with one critic and train another."""
        super().__init_subclass__(**kwargs)
        if "forward" in cls.__dict__ and "loss_and_grad" not in cls.__dict__:
            raise TypeError(f"{cls.__name__} overrides Critic.forward but not Critic.loss_and_grad, the closed form "
                            "that trains it: derive and override both, or make the critic a plain nn.Module, which "
                            "trains by autograd (docs/methods/aikd.md, 'Another critic').")

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

    def _weights(self, theta: Tensor | None = None) -> tuple[Tensor | None, ...]:
        """(W1, b1, gamma, beta, W2, b2): the fixed views, or views of ``theta`` (a value inside a compiled region,
        which must not read the module's views of a tensor it updates)."""
        if theta is None:
            norm = self.norm != "none"
            return (self.weight1, self.bias1, self.gamma if norm else None, self.beta if norm else None,
                    self.weight2, self.bias2)
        return self._split(theta)

    def _head(self, weight2: Tensor | None = None) -> Tensor:
        """w: the second layer and the mean (or sum) over its outputs in one, D = h w + c."""
        return (self.weight2 if weight2 is None else weight2).sum(0).mul_(self._out_scale)

    def _hidden(self, x: Tensor, weights: tuple[Tensor | None, ...] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(a_hat, s, y) for rows x of shape (..., N, C), normalised per leading group."""
        weight1, bias1, gamma, beta, _, _ = weights or self._weights()
        a = torch.addmm(bias1, x.reshape(-1, x.shape[-1]), weight1.T).view(*x.shape[:-1], self.hidden)
        if self.norm == "none":
            return a, a.new_ones(()), a
        dim = -2 if self.norm == "batch" else -1
        k = a.shape[dim]
        centred = torch.sub(a, a.sum(dim, keepdim=True), alpha=1 / k)
        # 1 / sqrt(biased variance + eps), as the layers compute it
        scale = centred.square().sum(dim, keepdim=True).mul_(1 / k).add_(NORM_EPS).rsqrt_()
        normed = centred * scale
        return normed, scale, torch.addcmul(beta, normed, gamma)

    def forward(self, logits: Tensor) -> Tensor:
        """D(logits): one score per row (differentiable in the logits; the critic's own weights are constants).

        In the critic's own precision (float32), with autocast off, whatever the caller runs under: the critic
        trains in float32 (:func:`train_critic`), so L_A must score with the same function, not a bf16 or fp16
        rounding of it. The gradient reaches low-precision logits through the cast.
        """
        with torch.autocast(logits.device.type, enabled=False):
            _, _, y = self._hidden(logits.to(self.theta.dtype))
            return nn.functional.leaky_relu(y, self.negative_slope) @ self._head() + \
                self.bias2.sum() * self._out_scale

    def loss_and_grad(self, real: Tensor, fake: Tensor, eps: Tensor, gp_weight: float, theta: Tensor | None = None
                      ) -> tuple[Tensor, CriticStats]:
        """L_D's gradient in ``theta``'s layout, and L_D with its parts, for interpolation weights ``eps`` (N, 1).

        Written for few operations (each costs more to launch than to compute at these sizes): the three
        groups of rows go through the first layer together, and sums stand where means would cost two.
        ``theta`` evaluates at other weights than the critic's own (:func:`critic_steps`).
        """
        n, slope, lam = real.shape[0], self.negative_slope, gp_weight
        weights = self._weights(theta)
        weight1, _, gamma, _, weight2, _ = weights
        x = torch.stack((real, fake, torch.lerp(fake, real, eps)))  # (3, N, C): real, fake, x_hat
        normed, scale, y = self._hidden(x, weights)
        h = nn.functional.leaky_relu(y, slope)
        slopes = torch.ops.aten.leaky_relu_backward(torch.ones_like(y), y, slope, False)  # phi'(y)
        w = self._head(weight2)  # D = h w + c; c cancels in L_D
        h_sum = h.sum(1)  # (3, H)
        h_gap = torch.sub(h_sum[1], h_sum[0]).mul_(1 / n)  # mean h over fake rows - over real rows
        fake_minus_real = h_gap @ w  # E[D(fake)] - E[D(real)]
        norm = self.norm != "none"
        slopes_x, normed_x, scale_x = slopes[2], normed[2], scale[2] if norm else scale

        # The penalty at x_hat: G = d sum_i D(x_hat_i) / d x_hat, per row.
        g_y = slopes_x * w
        g_hat = g_y * gamma if norm else g_y
        g_a, g_hat_along = _project(g_hat, normed_x, scale_x, self._norm_dim) if norm else (g_hat, None)
        grad_x = g_a @ weight1
        norms = torch.linalg.vector_norm(grad_x, dim=1)
        off = norms - 1
        gp = (off @ off).mul_(1 / n)
        loss = torch.add(fake_minus_real, gp, alpha=lam)

        # Backward: dL/dG, then back through G = g_a W1 and the normalisation's Jacobian.
        d_grad_x = grad_x * off.div_(norms).mul_(2 * lam / n).unsqueeze(1)
        d_g_a = d_grad_x @ weight1.T
        # The critic's scores: dL/dD = +1/N for fake rows, -1/N for real ones (x_hat's scores do not enter L_D).
        d_y = slopes[:2] * (w / n)  # (2, N, H)
        d_y[0].neg_()
        grad = torch.empty_like(self.theta if theta is None else theta)
        d_weight1, d_bias1, d_gamma, d_beta, d_weight2, d_bias2 = self._split(grad)
        torch.mm(g_a.T, d_grad_x, out=d_weight1)
        if norm:
            dim = self._norm_dim
            k = normed_x.shape[dim]
            d_g_hat, d_g_a_along = _project(d_g_a, normed_x, scale_x, dim)  # the Jacobian is self-adjoint
            # a_hat's two appearances in g_a, through -a_hat mean(g_hat a_hat):
            d_normed_x = (d_g_a * g_hat_along).addcmul_(g_hat, d_g_a_along).mul_(scale_x * (-1 / k))
            d_scale_x = (d_g_a * g_a).sum(dim, keepdim=True).div_(scale_x)  # g_a's factor s
            d_g_y = d_g_hat * gamma
            d_normed = torch.cat((d_y * gamma, d_normed_x.unsqueeze(0)))
            d_a, _ = _project(d_normed, normed, scale, dim + 1)
            d_a[2].addcmul_(normed_x, scale_x.square().mul_(d_scale_x), value=-1 / k)  # d var / d a for x_hat
            torch.add((d_y * normed[:2]).sum((0, 1)), (d_g_hat * g_y).sum(0), out=d_gamma)
            torch.sum(d_y, (0, 1), out=d_beta)
        else:
            d_g_y = d_g_a
            d_a = torch.cat((d_y, torch.zeros_like(d_g_a).unsqueeze(0)))  # x_hat's a only enters through phi'
        d_w = h_gap.add_((d_g_y * slopes_x).sum(0))
        d_weight1.addmm_(d_a.reshape(-1, d_a.shape[-1]).T, x.reshape(-1, x.shape[-1]))
        torch.sum(d_a, (0, 1), out=d_bias1)
        d_weight2.copy_((d_w * self._out_scale).expand_as(d_weight2))
        d_bias2.zero_()  # c cancels in L_D
        return grad, CriticStats(loss, torch.neg(fake_minus_real), gp)

    def _split(self, flat: Tensor) -> tuple[Tensor | None, ...]:
        """Views of a tensor in ``theta``'s layout: (W1, b1, gamma, beta, W2, b2), None for an absent norm's."""
        h, c, o = self.hidden, self.num_classes, self.out_features
        sizes = [h * c, h, *([h, h] if self.norm != "none" else []), o * h, o]
        parts = list(flat.split(sizes))
        if self.norm == "none":
            parts[2:2] = [None, None]
        w1, b1, gamma, beta, w2, b2 = parts
        return w1.view(h, c), b1, gamma, beta, w2.view(o, h), b2


def has_closed_form(critic: nn.Module) -> bool:
    """Whether ``critic`` trains by the closed form (a :class:`Critic`: the paper's architecture, whose derivatives
    are written out) or by autograd (any other module)."""
    return isinstance(critic, Critic)


class LayeredCritic(nn.Module):
    """The paper's critic from ordinary layers: nn.Linear, nn.BatchNorm1d in training mode or nn.LayerNorm,
    nn.LeakyReLU, nn.Linear, then the mean (or sum) of the outputs.

    The same function as :class:`Critic` with the same settings, trained by autograd (:func:`critic_loss`): the
    starting point of another architecture (insert a layer into ``net``), and what the closed form is tested
    against. ``from_critic`` copies a Critic's weights; ``flat`` and ``flat_grad`` are in Critic.theta's layout.
    """

    def __init__(self, num_classes: int, hidden: int = 64, out_features: int = 32, negative_slope: float = 0.2,
                 reduce: Literal["mean", "sum"] = "mean", norm: Norm = "batch") -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(num_classes, hidden)]
        if norm == "batch":
            layers.append(nn.BatchNorm1d(hidden))
        elif norm == "layer":
            layers.append(nn.LayerNorm(hidden))
        layers += [nn.LeakyReLU(negative_slope), nn.Linear(hidden, out_features)]
        self.net = nn.Sequential(*layers)
        self.reduce = reduce

    @classmethod
    def from_critic(cls, critic: Critic) -> LayeredCritic:
        """The layers with ``critic``'s settings, weights and precision."""
        layered = cls(critic.num_classes, critic.hidden, critic.out_features, critic.negative_slope, critic.reduce,
                      critic.norm).to(critic.theta.dtype)
        with torch.no_grad():
            start = 0
            for param in layered.parameters():  # Critic.theta's layout is the layers' order
                param.copy_(critic.theta[start:start + param.numel()].view_as(param))
                start += param.numel()
        return layered

    def forward(self, x: Tensor) -> Tensor:
        scores = self.net(x)
        return scores.mean(1) if self.reduce == "mean" else scores.sum(1)

    def flat(self) -> Tensor:
        """The weights in Critic.theta's layout (Linear1, [norm affine], Linear2)."""
        return torch.cat([p.detach().reshape(-1) for p in self.parameters()])

    def flat_grad(self) -> Tensor:
        return torch.cat([p.grad.reshape(-1) for p in self.parameters()])


def gradient_penalty(critic: nn.Module, real: Tensor, fake: Tensor, eps: Tensor) -> Tensor:
    """E[(||grad_x D(x_hat)||_2 - 1)^2] at x_hat = eps real + (1 - eps) fake, by autograd: ``create_graph=True``
    keeps the input gradient differentiable, so that L_D's backward reaches the weights through it."""
    x_hat = torch.lerp(fake, real, eps).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    return (torch.linalg.vector_norm(grad, dim=1) - 1).square().mean()


def critic_loss(critic: nn.Module, real: Tensor, fake: Tensor, eps: Tensor, gp_weight: float) -> CriticStats:
    """L_D (differentiable in the critic's weights) with its parts, for any critic module: the general path.

    Real, fake and interpolated rows go through the critic as separate calls, so a BatchNorm normalises each
    group by its own statistics (as :meth:`Critic.loss_and_grad` does)."""
    d_real, d_fake = critic(real).mean(), critic(fake).mean()
    gp = gradient_penalty(critic, real, fake, eps)
    return CriticStats(d_fake - d_real + gp_weight * gp, (d_real - d_fake).detach(), gp.detach())


def autograd_steps(critic: nn.Module, optimizer: torch.optim.Optimizer, real: Tensor, fake: Tensor, eps: Tensor,
                   gp_weight: float, strategy: Strategy = SINGLE_PROCESS) -> CriticStats:
    """``len(eps)`` steps of any critic module on L_D: :func:`critic_loss`, backward, the gradients averaged over
    the ranks, and ``optimizer.step()`` unless L_D is not finite on some rank (decided on the host: this path is
    for generality, not speed). The weights take gradients only here: outside, they are constants (L_A) and hold
    no gradient."""
    params = list(critic.parameters())
    wanted = [p.requires_grad for p in params]
    stats = None
    try:
        critic.requires_grad_(True)
        with torch.enable_grad():
            for step in range(eps.shape[0]):
                optimizer.zero_grad(set_to_none=True)
                stats = critic_loss(critic, real, fake, eps[step], gp_weight)
                stats.loss.backward()
                strategy.average_gradients(params)
                if not bool(_not_finite(stats.loss.detach(), strategy)):
                    optimizer.step()
            optimizer.zero_grad(set_to_none=True)  # no gradient outside its steps
    finally:
        for p, flag in zip(params, wanted, strict=True):
            p.requires_grad_(flag)
    return CriticStats(stats.loss.detach(), stats.gap, stats.gp)


def scores(critic: nn.Module, logits: Tensor) -> Tensor:
    """D(logits) in the critic's own precision, autocast off (a :class:`Critic` sees to that in its forward)."""
    if has_closed_form(critic):
        return critic(logits)
    with torch.autocast(logits.device.type, enabled=False):
        return critic(logits.to(next(critic.parameters()).dtype))


def critic_optimizer(critic: nn.Module, lr: float, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Adam:
    """The critic's Adam: for a :class:`Critic`, fused (one kernel for its one flat tensor), else PyTorch's default
    implementation; for another module, an ordinary Adam over its parameters."""
    if not has_closed_form(critic):
        return torch.optim.Adam(critic.parameters(), lr=lr, betas=betas)
    try:
        return torch.optim.Adam([critic.theta], lr=lr, betas=betas, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
        return torch.optim.Adam([critic.theta], lr=lr, betas=betas)


@dataclass
class AdamSettings:
    """A torch.optim.Adam's numbers for the one tensor it trains, and its state tensors (updated in place)."""

    exp_avg: Tensor
    exp_avg_sq: Tensor
    step: Tensor
    lr: float | Tensor
    betas: tuple[float, float]
    eps: float
    weight_decay: float


def adam_settings(optimizer: torch.optim.Optimizer, theta: Tensor) -> AdamSettings | None:
    """What :func:`adam_update` needs from ``optimizer``, once it holds state for ``theta`` (its first ``step()``
    creates the state in torch's own format); None before, and for options the explicit update leaves out."""
    state, group = optimizer.state.get(theta), optimizer.param_groups[0]
    if not isinstance(optimizer, torch.optim.Adam) or not state or group["amsgrad"] or group["maximize"] or \
            group.get("decoupled_weight_decay") or group.get("differentiable"):
        return None
    return AdamSettings(state["exp_avg"], state["exp_avg_sq"], state["step"], group["lr"], tuple(group["betas"]),
                        group["eps"], group["weight_decay"])


def adam_update(theta: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: Tensor, ok: Tensor,
                adam: AdamSettings) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """torch.optim.Adam's step (L2 weight decay; no amsgrad, no maximize) as pure tensor operations: the new
    (theta, exp_avg, exp_avg_sq, step), or the old ones where ``ok`` is false (a non-finite step does not
    count, as with GradScaler's ``found_inf``). Written out so torch.compile can fuse it with the critic's
    step; the state itself is :class:`AdamSettings`', so checkpoints keep torch's format.

        m = b1 m + (1 - b1) g,  v = b2 v + (1 - b2) g^2,  t = t + 1,
        theta = theta - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    """
    beta1, beta2 = adam.betas
    if adam.weight_decay:
        grad = grad.add(theta, alpha=adam.weight_decay)
    counted = step + 1
    m = torch.lerp(exp_avg, grad, 1 - beta1)
    v = exp_avg_sq.mul(beta2).addcmul_(grad, grad, value=1 - beta2)
    t = counted.to(theta.dtype)  # the count is float32: bias corrections in the weights' precision
    bias1, bias2 = 1 - torch.pow(beta1, t), 1 - torch.pow(beta2, t)
    denom = v.sqrt().div_(bias2.sqrt()).add_(adam.eps)
    moved = theta - m.div(denom).mul_(adam.lr / bias1)
    return (torch.where(ok, moved, theta), torch.where(ok, m, exp_avg), torch.where(ok, v, exp_avg_sq),
            torch.where(ok, counted, step))


def critic_steps(critic: Critic, adam: AdamSettings, real: Tensor, fake: Tensor, eps: Tensor, gp_weight: float,
                 strategy: Strategy = SINGLE_PROCESS) -> CriticStats:
    """``len(eps)`` critic steps with Adam's update, as one function of tensors (what train.compile compiles into
    one region); ``critic.theta`` and Adam's state are written once, at the end. The last step's numbers.

    The weights travel as values from step to step (not through the critic's views of ``theta``, which a
    compiled region must not read while it writes ``theta``). The same numbers as :func:`train_critic`'s
    step-by-step loop up to float rounding (a different order of operations than the fused Adam kernel).
    """
    theta, m, v, t = critic.theta.detach(), adam.exp_avg, adam.exp_avg_sq, adam.step
    stats = None
    for k in range(eps.shape[0]):
        grad, stats = critic.loss_and_grad(real, fake, eps[k], gp_weight, theta=theta)
        grad = strategy.mean_(grad)
        ok = _not_finite(stats.loss, strategy) == 0
        theta, m, v, t = adam_update(theta, grad, m, v, t, ok, adam)
    critic.theta.detach().copy_(theta)
    adam.exp_avg.copy_(m)
    adam.exp_avg_sq.copy_(v)
    adam.step.copy_(t)
    return stats


def train_critic(critic: nn.Module, optimizer: torch.optim.Optimizer, superior_logits: Tensor, student_logits: Tensor,
                 steps: int = 1, gp_weight: float = 10.0, strategy: Strategy = SINGLE_PROCESS,
                 loss_and_grad: Callable[..., tuple[Tensor, CriticStats]] | None = None,
                 fused_steps: Callable[..., CriticStats] | None = None) -> CriticStats:
    """``steps`` Adam steps of the critic on L_D for one batch of detached logits; the last step's numbers.

    Each step draws its own interpolation weights e ~ U(0, 1) per sample, from the global generator (all
    of them at once: the same numbers as one draw per step). A step whose L_D is not finite (a diverged
    student) is skipped, so it cannot poison the critic; with a fused Adam the skip is decided on the
    device (GradScaler's ``found_inf``), so no step waits for the host. In a data-parallel run pass the
    run's ``strategy``: it averages the gradient over the ranks and makes them skip together.
    ``loss_and_grad`` replaces ``critic.loss_and_grad`` (a compiled copy of it). ``fused_steps`` (a compiled
    :func:`critic_steps`, train.compile) runs all the steps at once, once Adam holds its state (the first call
    goes step by step, so that ``optimizer.step()`` creates that state in torch's format). A critic without the
    closed form (:func:`has_closed_form`) takes the same draws and trains by :func:`autograd_steps`.
    """
    closed_form = has_closed_form(critic)
    dtype = critic.theta.dtype if closed_form else next(critic.parameters()).dtype
    # The critic's own precision throughout: a caller's autocast would compute the penalty in bf16.
    with torch.autocast(superior_logits.device.type, enabled=False):
        real, fake = superior_logits.detach().to(dtype), student_logits.detach().to(dtype)
        eps = torch.rand(steps, real.shape[0], 1, dtype=dtype, device=real.device)
        if not closed_form:
            return autograd_steps(critic, optimizer, real, fake, eps, gp_weight, strategy)
        loss_and_grad = loss_and_grad or critic.loss_and_grad
        adam = adam_settings(optimizer, critic.theta) if fused_steps is not None else None
        if adam is not None:
            return fused_steps(adam, real, fake, eps, gp_weight, strategy)
        fused_step = _fused_adam(optimizer, critic.theta)
        for step in range(steps):
            grad, stats = loss_and_grad(real, fake, eps[step], gp_weight)
            grad = strategy.mean_(grad)  # one all-reduce for all the critic's weights
            skip = _not_finite(stats.loss, strategy)
            if fused_step is not None:
                fused_step(grad, skip)
                continue
            critic.theta.grad = grad
            if optimizer.defaults.get("fused", False):  # its first step: step() creates the state
                optimizer.found_inf = skip
                optimizer.step()
                fused_step = _fused_adam(optimizer, critic.theta)
            elif not bool(skip):
                optimizer.step()
    return stats


class Adversary(Part):
    """The critic together with what trains it: its Adam, its steps per student step, the penalty's weight and
    the run's processes. :meth:`learn` is one student step's worth of Eq. 6; the student's L_A (Eq. 7) reads
    ``critic``. The critic is a :class:`Critic` (the closed form) or any other module (autograd). Its optimizer's
    state is the part's extra state (``get_extra_state``): ``state_dict()`` holds it, under whichever owner."""

    def __init__(self, critic: nn.Module, lr: float, betas: tuple[float, float] = (0.9, 0.999), steps: int = 1,
                 gp_weight: float = 10.0, strategy: Strategy = SINGLE_PROCESS, compile: bool = False) -> None:
        super().__init__()
        if not has_closed_form(critic):  # trained by autograd: its weights are constants outside its steps (L_A)
            critic.requires_grad_(False)
        self.critic = critic
        self.optimizer = critic_optimizer(critic, lr, betas)
        self.steps, self.gp_weight, self.strategy = steps, gp_weight, strategy
        # With train.compile the critic's K closed-form steps (no double backward) and Adam's updates are one
        # compiled region (the closed form only: a critic module trains eagerly). A plain function, not a
        # sub-module: state_dict() keys do not change.
        self.fused_steps = compiled_or_eager(partial(critic_steps, critic), "train.compile (critic)") \
            if compile and has_closed_form(critic) else None

    def learn(self, superior_logits: Tensor, student_logits: Tensor) -> CriticStats:
        return train_critic(self.critic, self.optimizer, superior_logits, student_logits, self.steps, self.gp_weight,
                            self.strategy, fused_steps=self.fused_steps)

    def get_extra_state(self) -> dict:
        return {"critic_opt": self.optimizer.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["critic_opt"])


def _not_finite(loss: Tensor, strategy: Strategy) -> Tensor:
    """1.0 where ``loss`` (on any rank) is not finite, else 0.0: float32, as GradScaler's ``found_inf``.

    ``loss * 0 != 0`` is true exactly for inf and NaN: two operations where ``isfinite`` is five on the CPU
    (and then a negation and a cast), in a loop where each costs more to launch than to compute.
    """
    if strategy.distributed:
        return strategy.any_rank(loss.mul(0).ne(0))
    return loss.mul(0).ne_(0).float()  # ne_ keeps loss's dtype: 0.0 or 1.0


def _fused_adam(optimizer: torch.optim.Optimizer, theta: Tensor) -> Callable[[Tensor, Tensor], None] | None:
    """``optimizer.step()`` for a fused Adam over the one tensor ``theta`` as a function of (gradient, skip): the
    step is skipped on the device where ``skip`` (float32) is 1. None before Adam holds its state, for an Adam
    that is not fused, and for a build without the kernel: call ``step()``.

    It calls the fused kernel that ``step()`` would call, with the same state tensors, and leaves out the
    Python around it (about 0.15 ms a call here, as much as a third of a critic step). ``step()`` adds 1 to
    the step count, runs the kernel with ``found_inf`` and subtracts ``found_inf``; doing both before the kernel
    leaves the same count, and a skipped step's kernel writes nothing.
    """
    state, group = optimizer.state.get(theta), optimizer.param_groups[0]
    kernel = getattr(torch, "_fused_adam_", None)
    if not state or kernel is None or not group.get("fused") or group["amsgrad"] or group["weight_decay"] or \
            group["maximize"]:
        return None
    step, exp_avg, exp_avg_sq = state["step"], state["exp_avg"], state["exp_avg_sq"]
    (beta1, beta2), lr, eps = group["betas"], group["lr"], group["eps"]

    def fused_step(grad: Tensor, skip: Tensor) -> None:
        step.sub_(skip).add_(1)
        kernel([theta], [grad], [exp_avg], [exp_avg_sq], [], [step], lr=lr, beta1=beta1, beta2=beta2,
               weight_decay=0.0, eps=eps, amsgrad=False, maximize=False, grad_scale=None, found_inf=skip)

    return fused_step
