"""XiNet: online training and pruning of deep RL networks, in one file.

SAC (Haarnoja et al. 2018) on features learned online by OFENet (Ota et al. 2020), where every
hidden unit is multiplied by a Bernoulli gate xi_j ~ Bernoulli(theta_j). The gate parameters
theta are trained together with the weights on

    E_xi[ loss_N(W, xi) ] / s_N  +  gamma * P(theta) / P(1)                               (Eq. 3)

where P(theta) is the expected parameter count of the whole agent. The objective is affine in
each theta_j, so theta ends at 0 or 1; units at 0 are removed and every tensor that touches them
shrinks (Guenter & Sideris, arXiv 2507.11975). Only the paper's abstract is public: the
formulation here is this project's own, and the README's method notes say where it chooses.

Read top to bottom: config, data, building blocks, networks, the objective, pruning, the agent,
the update, checkpoints, environments, what a run shows, the loop, main. Equations are numbered
(Eq. 1-9) as in the README's table.

    python xinet.py --env Hopper-v4
"""
from __future__ import annotations

import argparse, ast, contextlib, copy, csv, dataclasses, inspect, io, json, math, os, signal, sys, time
from typing import Callable, Optional, Sequence, Union

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Config:
    env: str = "Hopper-v4"
    """gymnasium environment id (any with a Box action space)"""
    seed: int = 1
    """random seed of torch, numpy and the environments"""
    total_steps: int = 1_000_000
    """environment steps of the whole run"""
    learning_starts: int = 10_000
    """environment steps with uniformly random actions before any update"""
    pretrain_steps: int = 10_000
    """OFENet updates on the warm-up data before SAC starts"""
    batch_size: int = 256
    """minibatch size of every update"""
    buffer_size: int = 1_000_000
    """replay buffer capacity (transitions)"""
    discount: float = 0.99
    """SAC discount factor"""
    tau: float = 0.005
    """Polyak averaging rate of the target critics"""
    lr: float = 3e-4
    """Adam learning rate of the actor and OFENet weights"""
    critic_lr: float = 3e-4
    """Adam learning rate of the twin critics and the temperature"""
    hidden: int = 256
    """units in each of the two hidden layers of the actor and of each critic"""
    ofenet: bool = True
    """learn OFENet features for SAC (--no-ofenet: plain SAC on raw observations)"""
    ofe_layers: int = 0
    """DenseNet layers per OFENet block (0: per-environment default, 6 or 8)"""
    ofe_units: int = 0
    """units per OFENet layer (0: per-environment default, 40 or 30)"""
    gates: bool = True
    """Bernoulli-gate units and prune (--no-gates: the dense agent)"""
    gate: str = "ofenet,actor,critic"
    """comma-separated networks whose hidden units carry gates"""
    estimator: str = "flip"
    """gradient estimator of dE[loss]/dtheta: flip (unbiased) or pathwise (cheaper, biased)"""
    prune_strength: float = -1.0
    """gamma of Eq. 3, the price of a full agent's parameters in loss units (<0: 10 for flip, 1 for pathwise)"""
    prune_start: int = 30_000
    """environment step at which gate training and pruning begin (never before pre-training ends): by
    default 20k updates after the random steps, so that the agent has learned what its units are for"""
    prune_ramp: int = 10_000
    """environment steps over which gamma ramps linearly from 0 to its value"""
    prune_every: int = 1_000
    """environment steps between pruning events"""
    gate_every: int = 4
    """environment steps between gate steps (theta's gradient, Eq. 6, and its step, Eq. 9)"""
    gate_lr: float = 1e-3
    """Adam learning rate of theta per environment step (a gate step uses gate_every times it)"""
    gate_momentum: float = 0.999
    """Adam's beta1 for theta per environment step: theta follows ~1/(1 - beta1) steps' estimates"""
    loss_ema: float = 0.99
    """decay of the running loss scale s_N of Eq. 3 per environment step"""
    eval_every: int = 5_000
    """environment steps between evaluations (and checkpoints)"""
    eval_episodes: int = 10
    """episodes per evaluation"""
    log_every: int = 1_000
    """environment steps (or pre-training updates) between progress lines"""
    device: str = "auto"
    """auto, cpu or cuda"""
    cuda_graphs: bool = True
    """on a GPU, replay each update as one recorded CUDA graph (re-recorded after pruning)"""
    threads: int = 0
    """torch CPU threads (0: torch's default)"""
    out: str = ""
    """run directory (default runs/<env>__<seed>__<timestamp>)"""
    arch_from: str = ""
    """build the architecture of this checkpoint with fresh weights and no gates"""
    keep_resume: bool = True
    """keep RUN_DIR/resume.pt (buffer, optimizers, RNGs) at the end, so --resume can extend the run"""
    capture_video: bool = False
    """render one deterministic episode to RUN_DIR/videos/step_<N>.mp4 at each evaluation"""
    video_every: int = 0
    """environment steps between videos (0: at each evaluation)"""
    tensorboard: bool = False
    """write progress.csv's columns and the surviving theta per network to RUN_DIR/tb for TensorBoard"""


CHOICES = {"estimator": ("flip", "pathwise"), "device": ("auto", "cpu", "cuda")}
DEFAULT_STRENGTH = {"flip": 10.0, "pathwise": 1.0}
NETWORKS = ("ofenet", "actor", "critic")
RESUMABLE = ("total_steps", "threads", "device", "cuda_graphs", "log_every", "keep_resume", "capture_video",
             "video_every", "tensorboard")  # may change on --resume


def flag(name: str) -> str:
    """The command-line flag of a Config field: total_steps -> --total-steps."""
    return "--" + name.replace("_", "-")


class UserError(Exception):
    """A mistake in the command line, environment or checkpoint: reported in one sentence."""


class Stopped(Exception):
    """Stopped(signal, step): SIGINT or SIGTERM stopped the run after its checkpoint was written."""


@contextlib.contextmanager
def user_path(path: str, verb: str = "write"):
    """Reports an OSError on `path` (no such folder, no permission, disk full) as a UserError."""
    try:
        yield path
    except OSError as e:
        raise UserError(f"cannot {verb} {path} ({e.strerror or e}).") from None


POSITIVE = ("total_steps", "batch_size", "buffer_size", "eval_every", "eval_episodes", "prune_every", "gate_every",
            "hidden", "log_every", "lr", "critic_lr", "gate_lr")
NOT_NEGATIVE = ("seed", "learning_starts", "pretrain_steps", "prune_start", "prune_ramp", "ofe_layers", "ofe_units", "threads",
                "video_every")


def validate(cfg: Config) -> Config:
    """Check the values a user can get wrong and fill in the estimator's default strength."""
    for f in dataclasses.fields(cfg):
        value, name = getattr(cfg, f.name), flag(f.name)
        if f.type in ("float", float) and not math.isfinite(value):
            raise UserError(f"{name} must be a finite number, got {value}.")
        if (f.name in POSITIVE and not value > 0) or (f.name in NOT_NEGATIVE and value < 0):
            raise UserError(f"{name} must {'be positive' if f.name in POSITIVE else 'not be negative'}, got {value}.")
    if not (0 < cfg.discount <= 1 and 0 < cfg.tau <= 1 and 0 <= cfg.loss_ema < 1 and 0 <= cfg.gate_momentum < 1):
        raise UserError("--discount and --tau must lie in (0, 1], --loss-ema and --gate-momentum in [0, 1).")
    if cfg.seed >= 2**32:
        raise UserError(f"--seed must be below 2**32 (numpy's seeds), got {cfg.seed}.")
    unknown = set(filter(None, cfg.gate.split(","))) - set(NETWORKS)
    if unknown:
        raise UserError(f"--gate takes a comma-separated subset of {', '.join(NETWORKS)}, not {', '.join(sorted(unknown))}.")
    have = [n for n in NETWORKS if cfg.ofenet or n != "ofenet"]
    if cfg.gates and not set(cfg.gate.split(",")) & set(have):
        raise UserError(f"--gate names none of this agent's networks ({', '.join(have)}); --no-gates trains it dense.")
    if cfg.ofenet and cfg.batch_size < 2:
        raise UserError("OFENet's BatchNorm needs two examples or more per batch: set --batch-size 2 or more, or --no-ofenet.")
    if cfg.ofenet and cfg.pretrain_steps and not cfg.learning_starts:
        raise UserError("OFENet pre-trains on the random steps' data: with --learning-starts 0, set --pretrain-steps 0.")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available.")
    if cfg.prune_strength < 0:
        cfg.prune_strength = DEFAULT_STRENGTH[cfg.estimator]
    return cfg


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

class ReplayBuffer:
    """A ring buffer of (obs, action, reward, next_obs, terminated), preallocated on `device`.

    `terminated` is the MDP's end (no bootstrap); a time-limit truncation is stored as not
    terminated, so the critic target still bootstraps from next_obs there. The fields are
    columns of one (capacity, 2 d_o + d_a + 2) tensor: adding is one copy, sampling one gather,
    and sampling reads the fill level from a device tensor, so it can be part of a CUDA graph.
    """

    def __init__(self, obs_dim: int, act_dim: int, capacity: int, device: torch.device):
        self.data = torch.zeros(capacity, 2 * obs_dim + act_dim + 2, device=device)
        self.split = (obs_dim, act_dim, 1, obs_dim, 1)  # obs | action | reward | next_obs | terminated
        self.count = torch.zeros((), dtype=torch.float64, device=device)  # = size, on the device
        self.capacity, self.device, self.pos, self.size = capacity, device, 0, 0

    def add(self, obs, action, reward, next_obs, terminated) -> None:
        row = np.concatenate([np.asarray(obs, np.float32).ravel(), np.asarray(action, np.float32).ravel(),
                              [reward], np.asarray(next_obs, np.float32).ravel(), [float(terminated)]])
        self.data[self.pos].copy_(torch.from_numpy(row.astype(np.float32)))
        self.pos, self.size = (self.pos + 1) % self.capacity, min(self.size + 1, self.capacity)
        self.count.fill_(self.size)

    def sample(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        """Uniform minibatch: obs (B, d_o), action (B, d_a), reward (B,), next_obs (B, d_o), terminated (B,)."""
        idx = (torch.rand(batch_size, dtype=torch.float64, device=self.device) * self.count).long()
        obs, action, reward, next_obs, terminated = self.data[idx].split(self.split, dim=1)
        return obs, action, reward.squeeze(1), next_obs, terminated.squeeze(1)


# ----------------------------------------------------------------------------------------------
# Building blocks: the Bernoulli-gated linear layer
# ----------------------------------------------------------------------------------------------

class GatedLinear(nn.Module):
    """y = xi * act(BN(W x + b)),  xi_j ~ Bernoulli(theta_j),  theta in [0, 1]^out.      (Eq. 1)

    Gate modes (METHOD.md section 2), chosen by the module's train/eval flag, like BatchNorm:
      train(): the layer's own training pass: xi is drawn per example and unit;
      eval():  everywhere else: the mean gate, y = theta * act(BN(W x + b)).
    At theta in {0, 1} the two agree.

    Gradient of theta in a training pass (Eq. 5, 6): the drawn xi acts as xi + theta - stopgrad(theta),
    so autograd gives theta the pathwise gradient sum_i dloss/dxi_i (Eq. 5). The flip estimator keeps
    each example's dloss/dxi (`self.gate.grad`) and `flip_estimate` corrects the pathwise gradient's
    bias from one extra forward pass with one gate per example flipped (`self.flip` for that pass).
    While theta.requires_grad is off (a step that trains the weights only) xi is a plain constant,
    and a layer marked `sure` (every theta exactly 1, so xi = 1 surely) skips the gate altogether.
    With gated=False this is a plain linear layer (+BN, activation): no theta, no gate.
    """

    def __init__(self, in_features: int, out_features: int, *, batch_norm: bool = False,
                 activation: Optional[Callable] = None, gated: bool = True,
                 estimator: str = "flip", min_units: int = 0):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.bn = nn.BatchNorm1d(out_features) if batch_norm else None
        self.activation = activation
        self.theta = nn.Parameter(torch.ones(out_features)) if gated else None
        self.estimator, self.min_units = estimator, min_units
        self.xi: Optional[torch.Tensor] = None    # (B, out) bool gates of the last training pass
        self.gate: Optional[torch.Tensor] = None  # (B, out) the same as a differentiable tensor
        self.flip: Optional[torch.Tensor] = None  # (B, out) bool: gates to flip in a replay pass
        self.sure = False                         # every theta is exactly 1 (set by Agent.mark_sure_gates)
        self._batch_stats = None                  # BN mean/var of the last training pass

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def _normalize(self, z: torch.Tensor) -> torch.Tensor:  # self.bn(z), without a module call's overhead
        bn, replay = self.bn, self.flip is not None  # a replay pass: the main pass's batch statistics, no update
        if self.training and not replay and self.theta is not None and self.theta.requires_grad and self.estimator == "flip":
            self._batch_stats = (z.mean(0).detach(), z.var(0, unbiased=False).detach())
        mean, var = self._batch_stats if replay else (bn.running_mean, bn.running_var)
        return F.batch_norm(z, mean, var, bn.weight, bn.bias, self.training and not replay, bn.momentum, bn.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in) -> (B, out)
        if self.out_features == 0:  # a layer pruned away entirely (possible in a DenseNet)
            self.xi = x.new_zeros(x.shape[0], 0, dtype=torch.bool)
            return x.new_zeros(x.shape[0], 0)
        h = F.linear(x, self.linear.weight, self.linear.bias)  # self.linear(x), a module call cheaper
        if self.bn is not None:
            h = self._normalize(h)
        if self.activation is not None:
            h = self.activation(h)
        if self.theta is None or (self.sure and not self.theta.requires_grad):
            return h  # no gate, or xi = theta = 1 surely
        if not self.training:
            return h * self.theta
        if self.flip is not None:
            return h * (self.xi ^ self.flip)
        self.xi = torch.rand_like(h) < self.theta.detach()  # (B, out) bool
        if not self.theta.requires_grad:  # a step for the weights only
            return h * self.xi
        self.gate = self.xi + self.theta - self.theta.detach()  # value xi, d/dtheta_j = sum_i d/dxi_ij
        if self.estimator == "flip" and self.gate.requires_grad:
            self.gate.retain_grad()  # per-example dloss/dxi: the control variate of flip_estimate
        return h * self.gate

    @torch.no_grad()
    def shrink(self, keep_out: Optional[torch.Tensor] = None, keep_in: Optional[torch.Tensor] = None,
               optimizers=()) -> None:
        """Physically remove output units (keep_out) and input columns (keep_in).

        Each parameter that shrinks is replaced by a smaller one, in this module and in every
        optimizer (param groups and state, e.g. Adam's moments, sliced the same way).
        """
        def cut(module: nn.Module, name: str, dim: int, index: torch.Tensor) -> None:
            old = getattr(module, name)
            new = nn.Parameter(old.index_select(dim, index), requires_grad=old.requires_grad)
            setattr(module, name, new)
            for opt in optimizers:
                for group in opt.param_groups:
                    group["params"] = [new if p is old else p for p in group["params"]]
                if old in opt.state:
                    opt.state[new] = {k: v.index_select(dim, index) if torch.is_tensor(v) and v.shape == old.shape
                                      else v for k, v in opt.state.pop(old).items()}

        if keep_in is not None and not bool(keep_in.all()):
            cut(self.linear, "weight", 1, keep_in.nonzero().squeeze(1))
            self.linear.in_features = self.linear.weight.shape[1]
        if keep_out is not None and not bool(keep_out.all()):
            index = keep_out.nonzero().squeeze(1)
            rows = [(self.linear, "weight"), (self.linear, "bias"), (self, "theta"), (self.bn, "weight"), (self.bn, "bias")]
            for module, name in rows:
                if getattr(module, name, None) is not None:
                    cut(module, name, 0, index)
            if self.bn is not None:
                self.bn.running_mean, self.bn.running_var = self.bn.running_mean[index], self.bn.running_var[index]
                self.bn.num_features = len(index)
            self.linear.out_features = len(index)
            self.xi = self.gate = self.flip = self._batch_stats = None
            self.sure = False


def weights(module: nn.Module) -> list[nn.Parameter]:
    """A module's parameters other than gate parameters: what its own optimizer trains."""
    return [p for n, p in module.named_parameters() if not n.endswith("theta")]


def gated_layers(module: nn.Module) -> list[GatedLinear]:
    """The GatedLinear layers of a module that carry gates, in registration order."""
    return [m for m in module.modules() if isinstance(m, GatedLinear) and m.theta is not None]


@torch.no_grad()
def flip_estimate(groups: list[list[GatedLinear]], losses: torch.Tensor,
                  replay: Callable[[], torch.Tensor]) -> dict[GatedLinear, torch.Tensor]:
    """Unbiased dE[L]/dtheta, L = mean_i loss_i: the pathwise gradient plus a flip correction. (Eq. 6)

    Exactly, dE[L]/dtheta_j = E[D_ij], D_ij = loss_i(xi_ij = 1) - loss_i(xi_ij = 0), all else equal.
    Its first-order part d_ij = dloss_i/dxi_ij is known for every example and unit from the main
    pass's backward (B * gate.grad). Each example i flips one unit j(i), drawn uniformly from its
    group's U units, and is evaluated again (`replay`): D_ij = (2 xi_ij - 1)(loss_i - loss_i^flip)
    for that unit. Then
        g_j = (1/B) sum_i d_ij + (U/B) sum_{i: j(i) = j} (D_ij - d_ij),
    unbiased since E over j(i) of the second sum is (1/B) sum_i (D_ij - d_ij). With d as control
    variate the flips only estimate what the linearisation misses: the variance falls from about
    (U/B) E[D^2] to (U/B) E[(D - d)^2]. Called before any backward pass, d = 0: plain flips.
    Groups are separable parts of the loss (the twin critics): column k of `losses` (B, G)
    depends only on group k's gates, so every group flips one unit per example in one replay.
    Call after the main pass (and its backward) and before the weights change.
    """
    B = losses.shape[0]
    groups = [[layer for layer in group if layer.out_features] for group in groups]
    units = []
    for group in groups:
        sizes = [layer.out_features for layer in group]
        units.append(sum(sizes))
        if not group:
            continue
        pick = torch.randint(units[-1], (B, 1), device=losses.device)  # j(i) within the group
        start = 0
        for layer, n in zip(group, sizes):
            layer.flip = pick == torch.arange(start, start + n, device=losses.device)  # (B, n)
            start += n
    try:
        delta = losses.detach() - replay()  # (B, G)
    finally:
        flips = {layer: layer.flip for group in groups for layer in group}
        for layer in flips:
            layer.flip = None
    grads = {}
    for k, (group, U) in enumerate(zip(groups, units)):
        for layer in group:
            D = (2.0 * layer.xi - 1.0) * delta[:, k:k + 1]           # (B, n) exact where flipped
            d = torch.zeros_like(D) if layer.gate.grad is None else layer.gate.grad * B  # dloss_i/dxi_ij
            grads[layer] = d.mean(0) + ((D - d) * flips[layer]).sum(0) * (U / B)
    return grads


def mlp(in_dim: int, widths: list[int], out_dim: int, gated: bool, estimator: str) -> nn.Sequential:
    """ReLU MLP whose hidden units are gated (each hidden layer keeps at least one unit)."""
    layers, d = [], in_dim
    for w in widths:
        layers.append(GatedLinear(d, w, activation=F.relu, gated=gated, estimator=estimator, min_units=1))
        d = w
    layers.append(GatedLinear(d, out_dim, gated=False))
    return nn.Sequential(*layers)


# ----------------------------------------------------------------------------------------------
# Networks: OFENet, actor, twin critics
# ----------------------------------------------------------------------------------------------

class OFENet(nn.Module):
    """Online feature extractor: two DenseNet blocks and an auxiliary next-observation head.

        z_o  = phi_o(o)        = [o, h_1, ..., h_L],     h_k = xi * swish(BN(W_k [o, h_<k]))
        z_oa = phi_oa(z_o, a)  = [z_o, a, g_1, ..., g_L], g_k likewise on [z_o, a, g_<k]   (Eq. 2)
        o'_hat = head(z_oa), trained by MSE on the next observation only.
    """

    def __init__(self, obs_dim: int, act_dim: int, state_widths: list[int], sa_widths: list[int],
                 gated: bool, estimator: str):
        super().__init__()
        self.obs_dim, self.act_dim = obs_dim, act_dim

        def block(d: int, widths: list[int]) -> nn.ModuleList:
            layers = nn.ModuleList()
            for w in widths:
                layers.append(GatedLinear(d, w, batch_norm=True, activation=F.silu, gated=gated,
                                          estimator=estimator))
                d += w
            return layers

        self.state_block = block(obs_dim, state_widths)
        self.sa_block = block(self.state_dim + act_dim, sa_widths)
        self.head = GatedLinear(self.state_action_dim, obs_dim, gated=False)

    @property
    def state_dim(self) -> int:  # width of z_o, as pruned so far
        return self.obs_dim + sum(layer.out_features for layer in self.state_block)

    @property
    def state_action_dim(self) -> int:  # width of z_oa
        return self.state_dim + self.act_dim + sum(layer.out_features for layer in self.sa_block)

    @staticmethod
    def _dense(x: torch.Tensor, block: nn.ModuleList) -> torch.Tensor:
        for layer in block:
            x = torch.cat([x, layer(x)], dim=-1)
        return x

    def state_features(self, obs: torch.Tensor) -> torch.Tensor:  # (B, d_o) -> (B, state_dim)
        return self._dense(obs, self.state_block)

    def state_action_features(self, z_o: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self._dense(torch.cat([z_o, action], dim=-1), self.sa_block)  # (B, state_action_dim)

    def predict_next_obs(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.head(self.state_action_features(self.state_features(obs), action))


LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


class Actor(nn.Module):
    """Tanh-squashed Gaussian policy a = scale * tanh(mu + sigma * eps) + bias on z_o."""

    def __init__(self, in_dim: int, widths: list[int], act_low: np.ndarray, act_high: np.ndarray,
                 gated: bool, estimator: str):
        super().__init__()
        act_dim = len(act_low)
        self.net = mlp(in_dim, widths, 2 * act_dim, gated, estimator)
        self.register_buffer("scale", torch.as_tensor((act_high - act_low) / 2, dtype=torch.float32))
        self.register_buffer("bias", torch.as_tensor((act_high + act_low) / 2, dtype=torch.float32))

    def forward(self, z: torch.Tensor, eps: Optional[torch.Tensor] = None, deterministic: bool = False):
        """Returns action (B, d_a) and log pi(action | z) (B,). `eps` fixes the policy noise.   (Eq. 8)"""
        mu, log_std = self.net(z).chunk(2, dim=-1)
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (torch.tanh(log_std) + 1)
        if deterministic:
            return torch.tanh(mu) * self.scale + self.bias, None
        if eps is None:
            eps = torch.randn_like(mu)
        u = mu + log_std.exp() * eps
        # log N(u; mu, sigma) - sum log |da/du|,  log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u))
        log_prob = (-0.5 * eps.pow(2) - log_std - 0.5 * math.log(2 * math.pi)
                    - 2 * (math.log(2) - u - F.softplus(-2 * u)) - self.scale.log()).sum(-1)
        return torch.tanh(u) * self.scale + self.bias, log_prob


class Critic(nn.Module):
    """Twin Q-networks on z_oa; forward returns both, (B, 2)."""

    def __init__(self, in_dim: int, widths: list[list[int]], gated: bool, estimator: str):
        super().__init__()
        self.qs = nn.ModuleList(mlp(in_dim, w, 1, gated, estimator) for w in widths)

    def forward(self, z_oa: torch.Tensor) -> torch.Tensor:
        return torch.cat([q(z_oa) for q in self.qs], dim=-1)


def td_target(reward: torch.Tensor, terminated: torch.Tensor, next_value: torch.Tensor,
              discount: float) -> torch.Tensor:
    """y = r + discount * (1 - terminated) * V(o'); a truncated step still bootstraps.   (Eq. 7)"""
    return reward + discount * (1.0 - terminated) * next_value


# ----------------------------------------------------------------------------------------------
# The objective: expected parameter count P(theta) and the projected gate step
# ----------------------------------------------------------------------------------------------

Source = Union[int, GatedLinear]  # a segment of a layer's input: a fixed width, or another layer's units
Wiring = list[tuple[GatedLinear, list[Source]]]  # every layer with the segments its input concatenates


class ExpectedParams(nn.Module):
    """P(theta) = sum over layers of E[out] * (E[in] + 1 + 2 [BN]),                      (Eq. 4)
    E[in] = sum over input segments of (fixed width or sum theta of the units read),
    E[out] = sum theta of the layer's own units (its width when ungated).

    Gates are independent and no unit reads itself, so E[in * out] = E[in] * E[out] exactly;
    P is multilinear in theta and, at binary theta, the parameter count of the compacted
    network. dP/dtheta_j is unit j's marginal cost: its fan-in, bias and BN, plus one weight
    in every layer that reads it: the per-unit weights of the cost-aware regulariser.

    Computed as a quadratic form in the vector e of the layers' expected widths E[out]:
        P = e . (a + c) + e . (A e),                                                  (Eq. 4')
    a_l = layer l's fixed input columns, c_l = 1 + 2 [BN], A_lm = 1 where layer l reads layer
    m. Pruning changes widths, never who reads whom, so a, c and A are built once, and P costs
    a handful of kernels instead of one per input segment.
    """

    def __init__(self, wiring: Wiring):
        super().__init__()
        self.layers = [layer for layer, _ in wiring]  # a plain list: not registered as submodules
        index = {layer: i for i, layer in enumerate(self.layers)}
        L = len(self.layers)
        device = self.layers[0].linear.weight.device if L else None
        A, fixed = torch.zeros(L, L), torch.zeros(L)
        for i, (layer, sources) in enumerate(wiring):
            fixed[i] = sum(s for s in sources if isinstance(s, int)) + 1 + (2 if layer.bn is not None else 0)
            for s in sources:
                if not isinstance(s, int):
                    if s not in index:
                        raise ValueError("every layer a wiring reads from must be listed in it")
                    A[i, index[s]] += 1
        self.gated = [i for i, layer in enumerate(self.layers) if layer.theta is not None]
        ungated = torch.tensor([0 if layer.theta is not None else layer.out_features for layer in self.layers],
                               dtype=torch.float32)
        self.register_buffer("A", A.to(device), persistent=False)
        self.register_buffer("fixed_in", fixed.to(device), persistent=False)
        self.register_buffer("ungated_width", ungated.to(device), persistent=False)
        self.register_buffer("gated_index", torch.tensor(self.gated, dtype=torch.long).to(device), persistent=False)

    def forward(self) -> torch.Tensor:
        e = self.ungated_width  # (L,) E[out] of every layer
        if self.gated:
            widths = torch.stack([self.layers[i].theta.sum() for i in self.gated])
            e = e.index_put((self.gated_index,), widths)
        return e @ self.fixed_in + e @ (self.A @ e)


@torch.no_grad()
def project_gates_(layers: list[GatedLinear], before: list[torch.Tensor]) -> None:
    """theta <- clip_[0,1](theta) after a gradient step (the projection of Eq. 9), which is what
    lands theta exactly on 0 or 1. A layer with min_units keeps its strongest unit alive."""
    thetas = [layer.theta for layer in layers]
    torch._foreach_clamp_min_(thetas, 0.0)
    torch._foreach_clamp_max_(thetas, 1.0)
    for layer, b in zip(layers, before):
        if layer.min_units:  # if the step emptied the layer, undo it for the strongest unit
            t = layer.theta
            strongest = torch.arange(len(b), device=b.device) == b.argmax()
            t.copy_(torch.where(strongest & (t.max() <= 0), b, t))  # no host sync: graph-safe


# ----------------------------------------------------------------------------------------------
# Pruning
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def prune_units(wiring: Wiring, optimizers=()) -> None:
    """Remove every gated unit whose theta is exactly 0, everywhere it appears.

    Its row of W, b, BN and theta goes, and so does every column that reads it downstream
    (in a DenseNet: all later layers of its block, the next block, the head; then the first
    layers of actor, critics and target critics), with the matching optimizer moments. A unit
    at theta = 0 outputs 0 in both gate modes, so the network computes exactly the same
    function before and after; only its tensors are smaller.
    """
    keep: dict[GatedLinear, torch.Tensor] = {}
    for layer, _ in wiring:
        if layer.theta is not None:
            k = layer.theta > 0
            if int(k.sum()) < layer.min_units:
                k[layer.theta.topk(layer.min_units).indices] = True
            keep[layer] = k
    for layer, sources in wiring:
        cols = [torch.ones(s, dtype=torch.bool, device=layer.linear.weight.device) if isinstance(s, int)
                else keep.get(s, torch.ones(s.out_features, dtype=torch.bool, device=layer.linear.weight.device))
                for s in sources]
        layer.shrink(keep.get(layer), torch.cat(cols), optimizers)


# ----------------------------------------------------------------------------------------------
# The agent
# ----------------------------------------------------------------------------------------------

class Agent(nn.Module):
    """OFENet + SAC with Bernoulli gates; owns the networks, their optimizers and the pruning.

    `nets` names the online networks, `gated` lists their layers that carry gates (target
    critics excluded; pruning shrinks layers in place and never removes one), `opts` the Adam
    optimizers: ofenet, actor, critic, alpha (the temperature) and gates (every theta).
    """

    def __init__(self, cfg: Config, obs_dim: int, act_low: np.ndarray, act_high: np.ndarray,
                 widths: Optional[dict[str, list]] = None, device: torch.device | str = "cpu"):
        super().__init__()
        self.cfg, self.obs_dim, self.act_dim = cfg, obs_dim, len(act_low)
        gated = set(filter(None, cfg.gate.split(","))) if cfg.gates else set()
        est = cfg.estimator
        layers, units = (8, 30) if cfg.env.startswith(("HalfCheetah", "Humanoid")) else (6, 40)  # OFENet's reference sizes
        layers, units = cfg.ofe_layers or layers, cfg.ofe_units or units
        w = widths or {"state": [units] * layers, "state_action": [units] * layers,
                       "actor": [cfg.hidden] * 2, "critic": [[cfg.hidden] * 2] * 2}
        if cfg.ofenet:
            self.ofenet = OFENet(obs_dim, self.act_dim, w["state"], w["state_action"], "ofenet" in gated, est)
            zo_dim, zoa_dim = self.ofenet.state_dim, self.ofenet.state_action_dim
        else:
            self.ofenet, zo_dim, zoa_dim = None, obs_dim, obs_dim + self.act_dim
        self.actor = Actor(zo_dim, w["actor"], act_low, act_high, "actor" in gated, est)
        self.critic = Critic(zoa_dim, w["critic"], "critic" in gated, est)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.nets = {k: v for k, v in (("ofenet", self.ofenet), ("actor", self.actor), ("critic", self.critic)) if v is not None}
        self.gated = [layer for net in self.nets.values() for layer in gated_layers(net)]
        self.log_alpha = nn.Parameter(torch.zeros(()))
        self.target_entropy = -float(self.act_dim)
        # divergence guard, kept on the device: is each of HEALTH finite so far, in how many updates
        self.register_buffer("finite", torch.ones(len(HEALTH), dtype=torch.bool), persistent=False)
        self.register_buffer("finite_updates", torch.zeros((), dtype=torch.long), persistent=False)
        self.to(device)
        k = cfg.gate_every  # one gate step per k environment steps: the same speed and memory per step
        params = {"ofenet": (weights(self.ofenet) if self.ofenet else [], cfg.lr), "actor": (weights(self.actor), cfg.lr),
                  "critic": (weights(self.critic), cfg.critic_lr), "alpha": ([self.log_alpha], cfg.critic_lr),
                  "gates": ([layer.theta for layer in self.gated], cfg.gate_lr * k, (cfg.gate_momentum ** k, 0.999 ** k))}
        cuda = torch.device(device).type == "cuda"  # one fused kernel per step; graph-capturable on a GPU
        self.opts = {name: torch.optim.Adam(p, lr=lr, betas=betas[0] if betas else (0.9, 0.999), fused=True, capturable=cuda)
                     for name, (p, lr, *betas) in params.items() if p}
        self.loss_scale: dict[str, torch.Tensor] = {}  # s_N of Eq. 3, per network
        self.expected_params = ExpectedParams(self.wiring(targets=False))  # P(theta), Eq. 4: agent.expected_params()
        self.dense_params = self.expected_params().item()  # P(1): every theta starts at 1
        self.eval()  # mean gates and BN running statistics, except in a network's training pass

    # --- structure -----------------------------------------------------------------------------
    def wiring(self, targets: bool = True) -> Wiring:
        """Every linear layer with the segments its input is concatenated from, in order.

        This is the one place that knows which units read which: P(theta) and prune() are
        generic over it. Target critics read the online OFENet's features.
        """
        o, a = self.obs_dim, self.act_dim
        wires: Wiring = []
        if self.ofenet is not None:
            S, SA = list(self.ofenet.state_block), list(self.ofenet.sa_block)
            z_o, z_oa = [o, *S], [o, *S, a, *SA]
            wires += [(layer, [o, *S[:k]]) for k, layer in enumerate(S)]
            wires += [(layer, [*z_o, a, *SA[:k]]) for k, layer in enumerate(SA)]
            wires.append((self.ofenet.head, z_oa))
        else:
            z_o, z_oa = [o], [o, a]
        for net, inputs in [(self.actor.net, z_o), *[(q, z_oa) for q in self.critic.qs],
                            *[(q, z_oa) for q in (self.critic_target.qs if targets else [])]]:
            for layer in net:  # an MLP: each layer reads the one before
                wires.append((layer, inputs))
                inputs = [layer]
        return wires

    def hidden_layers(self) -> dict[str, GatedLinear]:
        """Every online layer whose units can be gated, i.e. that another layer reads: OFENet's blocks,
        actor and critic hidden layers (named as in the state dict, e.g. 'ofenet.state_block.0')."""
        read = {s for _, sources in self.wiring(targets=False) for s in sources if not isinstance(s, int)}
        return {name: m for name, m in self.named_modules() if m in read}

    def widths(self) -> dict[str, list]:
        """Hidden widths per layer: enough to rebuild this (possibly pruned) architecture."""
        hidden = lambda layers: [layer.out_features for layer in layers]
        w = {"actor": hidden(self.actor.net[:-1]), "critic": [hidden(q[:-1]) for q in self.critic.qs]}
        if self.ofenet is not None:
            w.update(state=hidden(self.ofenet.state_block), state_action=hidden(self.ofenet.sa_block))
        return w

    @torch.no_grad()
    def sizes(self) -> dict[str, float]:
        """What the agent costs, all derived from its layers: `params` (weights, biases, BN affine;
        no targets, theta or alpha), P(theta), `params_<network>`, P(1), the FLOPs (multiply-adds x 2)
        of one deterministic action (phi_o + actor), surviving theta at 1 and inside (0, 1) in all
        and per network, and `alive_<layer>`, the units present in each hidden layer."""
        count = lambda mods: sum(p.numel() for m in mods for n, p in m.named_parameters() if not n.endswith("theta"))
        acting = (list(self.ofenet.state_block) if self.ofenet is not None else []) + list(self.actor.net)
        s = {"params": count(layer for layer, _ in self.wiring(targets=False)),
             "expected_params": self.expected_params().item(),
             **{f"params_{k}": count([net]) for k, net in self.nets.items()}, "dense_params": self.dense_params,
             "flops_per_action": sum(2 * layer.linear.in_features * layer.out_features for layer in acting)}
        thetas = {k: torch.cat([l.theta.cpu() for l in gated_layers(net)] or [torch.zeros(0)]) for k, net in self.nets.items()}
        counts = {f"theta_{kind}_{k}": int(test(t).sum()) for k, t in thetas.items()
                  for kind, test in (("one", lambda t: t == 1), ("inside", lambda t: (t > 0) & (t < 1)))}
        for kind in ("one", "inside"):
            s[f"theta_{kind}"] = sum(v for k, v in counts.items() if k.startswith(f"theta_{kind}_"))
        return {**s, **counts, **{f"alive_{k}": int((m.theta > 0).sum()) if m.theta is not None else m.out_features
                                  for k, m in self.hidden_layers().items()}}

    # --- acting ------------------------------------------------------------------------------
    def state_features(self, obs: torch.Tensor) -> torch.Tensor:
        return obs if self.ofenet is None else self.ofenet.state_features(obs)

    def state_action_features(self, z_o: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        if self.ofenet is None:
            return torch.cat([z_o, action], dim=-1)
        return self.ofenet.state_action_features(z_o, action)

    @torch.no_grad()
    def act(self, obs: np.ndarray, deterministic: bool = True) -> np.ndarray:
        """Action for one observation (d_o,) or a batch (N, d_o); mean gates, BN running stats."""
        self.eval()
        x = torch.as_tensor(obs, dtype=torch.float32, device=self.log_alpha.device)
        return self.policy(x, deterministic).cpu().numpy()

    @torch.no_grad()
    def policy(self, obs: torch.Tensor, deterministic: bool = True) -> torch.Tensor:
        """act() on a tensor (..., d_o) -> (..., d_a), on the agent's device. The agent is in
        eval mode (mean gates) except inside a network's training pass; act() makes sure."""
        action, _ = self.actor(self.state_features(obs.reshape(-1, self.obs_dim)), deterministic=deterministic)
        return action.reshape(*obs.shape[:-1], self.act_dim)

    @torch.no_grad()
    def q_values(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        self.eval()
        return self.critic(self.state_action_features(self.state_features(obs), action))

    # --- pruning -------------------------------------------------------------------------------
    @torch.no_grad()
    def copy_gates_to_targets(self) -> None:
        """Target critics' theta mirror the online critics' (so both prune the same units)."""
        for target, online in zip(gated_layers(self.critic_target), gated_layers(self.critic)):
            target.theta.copy_(online.theta)

    def prune(self) -> int:
        """Remove every unit whose theta is exactly 0 from every network, the target critics
        and the optimizers' state (Section 4); returns the number of units removed."""
        width = lambda: sum(layer.out_features for layer in self.gated)
        before = width()
        self.copy_gates_to_targets()
        prune_units(self.wiring(targets=True), self.opts.values())
        self.mark_sure_gates()
        return before - width()

    @torch.no_grad()
    def mark_sure_gates(self) -> None:
        """Mark the layers whose every theta is exactly 1: their xi is 1 surely, so until the
        next gate step they skip drawing it. One host sync, after a gate step, outside `update`."""
        layers = self.gated + gated_layers(self.critic_target)
        if layers:
            for layer, sure in zip(layers, torch.stack([(layer.theta == 1).all() for layer in layers]).tolist()):
                layer.sure = sure


# ----------------------------------------------------------------------------------------------
# The update
# ----------------------------------------------------------------------------------------------

# What the divergence guard watches, and the flags most likely at fault when it goes non-finite
HEALTH = {"OFENet's auxiliary loss": "--lr", "the critics' TD loss": "--critic-lr (or the reward scale)",
          "the actor's loss": "--lr", "the temperature": "--critic-lr"}

def loss_scale(agent: Agent, key: str, losses: torch.Tensor) -> torch.Tensor:
    """s_N <- beta * s_N + (1 - beta) * mean_i |loss_i|: a gradient-free size of network N's loss,
    so that one gamma means the same for every network and reward scale (Eq. 3). Each loss_i must
    be the part of the loss that N's units can change: the actor's is centred per state. Updated
    at gate steps, every gate_every environment steps, with beta = loss_ema ** gate_every."""
    size = losses.detach().abs().mean()
    if key not in agent.loss_scale:
        agent.loss_scale[key] = size.clone()
    else:
        agent.loss_scale[key].lerp_(size, 1.0 - agent.cfg.loss_ema ** agent.cfg.gate_every)
    return agent.loss_scale[key].clamp_min(1e-8)


def train_network(agent: Agent, key: str, net: nn.Module, per_example_loss: Callable[[], torch.Tensor], gates_on: bool,
                  groups: Optional[list[list[GatedLinear]]] = None) -> torch.Tensor:
    """One gradient step of network `net` on its own loss; writes theta.grad of E[loss]/s_N.

    `per_example_loss()` runs the network's training pass (sampled gates) and returns (B, G)
    losses whose sum over G, averaged over B, is the loss. With the flip estimator it is
    called once more with flipped gates, before the weights move.
    """
    net.train()
    losses = per_example_loss()
    loss = losses.sum(-1).mean()
    layers = gated_layers(net) if gates_on else []
    optimizer = agent.opts[key]
    optimizer.zero_grad(set_to_none=True)
    loss.backward(inputs=weights(net) + [layer.theta for layer in layers])  # theta: pathwise (Eq. 5)
    if layers and agent.cfg.estimator == "flip":
        for layer, grad in flip_estimate(groups or [layers], losses, per_example_loss).items():
            layer.theta.grad = grad
    optimizer.step()
    for layer in layers:  # a layer pruned to width 0 has no gradient
        if layer.theta.grad is None:
            layer.theta.grad = torch.zeros_like(layer.theta)
    if layers:
        torch._foreach_div_([layer.theta.grad for layer in layers], loss_scale(agent, key, losses.sum(-1)))
    net.eval()
    return loss.detach()


def update_ofenet(agent: Agent, obs, action, next_obs, gates_on: bool) -> torch.Tensor:
    """Auxiliary loss: MSE of the predicted next observation, per example (B, 1)."""
    ofenet = agent.ofenet
    errors = lambda: (ofenet.predict_next_obs(obs, action) - next_obs).pow(2).mean(-1, keepdim=True)
    return train_network(agent, "ofenet", ofenet, errors, gates_on)


@torch.no_grad()
def polyak_(target: nn.Module, online: nn.Module, tau: float) -> None:
    """target <- (1 - tau) target + tau online, for weights; gates are copied in gate_step."""
    torch._foreach_lerp_(weights(target), weights(online), tau)


def gate_step(agent: Agent, strength: float | torch.Tensor) -> None:
    """theta <- clip_[0,1](theta - Adam(dL/dtheta + strength * dP/dtheta / P(1)))      (Eq. 9)

    theta.grad already holds each network's loss term; P's gradient is every unit's marginal
    cost (fan-in + one weight per downstream reader), the cost-aware regulariser. The last unit
    of an MLP hidden layer is not allowed to leave. Target critics' gates mirror the online ones.
    """
    layers = agent.gated
    if not layers:
        return
    thetas = [layer.theta for layer in layers]
    cost = torch.autograd.grad(agent.expected_params() / agent.dense_params, thetas)
    before = [t.detach().clone() for t in thetas]
    for t in thetas:
        if t.grad is None:
            t.grad = torch.zeros_like(t)
    torch._foreach_add_([t.grad for t in thetas], torch._foreach_mul(cost, strength))
    agent.opts["gates"].step()
    agent.opts["gates"].zero_grad(set_to_none=True)
    project_gates_(layers, before)
    agent.copy_gates_to_targets()
    for layer in layers + gated_layers(agent.critic_target):  # theta moved: Agent.mark_sure_gates
        layer.sure = False                                     # decides again, outside the update


def update_temperature(agent: Agent, log_prob: torch.Tensor) -> None:
    """alpha <- alpha - lr * d/dlog(alpha) [-log(alpha) (log pi + target_entropy)]: alpha grows
    while the policy's entropy -log pi is below the target -d_a, and shrinks above it."""
    loss = -(agent.log_alpha * (log_prob.detach() + agent.target_entropy)).mean()
    agent.opts["alpha"].zero_grad(set_to_none=True)
    loss.backward()
    agent.opts["alpha"].step()


def update(agent: Agent, batch, gates_on: bool = False,
           strength: float | torch.Tensor = 0.0) -> dict[str, torch.Tensor]:
    """One XiNet step on a minibatch: OFENet, twin critics, actor, temperature and, with
    `gates_on` (a gate step), the gates; otherwise theta is a constant and xi is only drawn."""
    cfg = agent.cfg
    obs, action, reward, next_obs, terminated = batch
    agent.eval()  # mean gates and BN running statistics wherever a network is not training
    for layer in agent.gated:
        layer.theta.requires_grad_(gates_on)
    if gates_on:
        agent.opts["gates"].zero_grad(set_to_none=True)
    info = {}
    if agent.ofenet is not None:
        info["ofenet_loss"] = update_ofenet(agent, obs, action, next_obs, gates_on)

    alpha = agent.log_alpha.exp().detach()
    with torch.no_grad():  # o and o' share each pass: BN uses running statistics here
        z_o, z_next = agent.state_features(torch.cat([obs, next_obs])).chunk(2)  # (B, state_dim) x2
        next_action, next_logp = agent.actor(z_next)
        z_oa, z_next_a = agent.state_action_features(torch.cat([z_o, z_next]),
                                                     torch.cat([action, next_action])).chunk(2)
        next_q = agent.critic_target(z_next_a).min(-1).values                    # (B,)
        y = td_target(reward, terminated, next_q - alpha * next_logp, cfg.discount)  # (B,)

    td_errors = lambda: (agent.critic(z_oa) - y[:, None]).pow(2)  # (B, 2): separable twins
    groups = [gated_layers(q) for q in agent.critic.qs]
    info["critic_loss"] = train_network(agent, "critic", agent.critic, td_errors, gates_on, groups)

    def soft_value(a: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:  # (B,): alpha log pi - min_k Q_k
        return alpha * logp - agent.critic(agent.state_action_features(z_o, a)).min(-1).values

    baseline = 0.0  # the same at another action a' ~ pi: a per-state baseline, so that s_N
    if gates_on and gated_layers(agent.actor):  # measures soft advantages, not the level of Q
        with torch.no_grad():
            baseline = soft_value(*agent.actor(z_o))
    eps = torch.randn(obs.shape[0], agent.act_dim, device=obs.device)  # one noise for both passes
    log_probs = []

    def policy_loss() -> torch.Tensor:  # (B, 1): alpha log pi(a|o) - min_k Q_k(o, a) - baseline, a ~ pi
        a, logp = agent.actor(z_o, eps)
        log_probs.append(logp.detach())
        return (soft_value(a, logp) - baseline)[:, None]

    info["actor_loss"] = train_network(agent, "actor", agent.actor, policy_loss, gates_on)
    update_temperature(agent, log_probs[0])
    polyak_(agent.critic_target, agent.critic, cfg.tau)
    if gates_on:
        gate_step(agent, strength)
    for layer in agent.gated:
        layer.theta.requires_grad_(True)
    watched = [info.get("ofenet_loss", alpha), info["critic_loss"], info["actor_loss"], agent.log_alpha.detach()]
    agent.finite &= torch.isfinite(torch.stack(watched))  # no host sync: the loop reads it per block
    agent.finite_updates += agent.finite.all()
    return info


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------

FORMAT, RESUME_FORMAT = "xinet-agent-1", "xinet-resume-1"
KINDS = {FORMAT: "an agent (agent.pt)", RESUME_FORMAT: "a run's resume state (resume.pt)"}


def write_atomically(path: str, write: Callable) -> None:
    """write(file) into a temporary file, then rename it to `path`: a run killed at any moment
    leaves the old file or the new one, never half of one. A failed write (disk full, folder
    gone, no permission) keeps the old file and ends in one sentence."""
    try:
        with open(f"{path}.tmp", "wb") as f:
            write(f)
        os.replace(f"{path}.tmp", path)
    except BaseException as e:  # also a second Ctrl-C mid-write: the old file stays whole
        with contextlib.suppress(OSError):
            os.remove(f"{path}.tmp")
        if not isinstance(e, (OSError, RuntimeError)):  # torch.save reports a failed write as a RuntimeError
            raise
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise UserError(f"cannot write {path} ({why}); the previous one, if any, is kept.") from None


def agent_payload(agent: Agent) -> dict:
    """The deployable agent: config, (compacted) architecture, weights, theta, BN statistics."""
    return {"format": FORMAT, "config": dataclasses.asdict(agent.cfg), "obs_dim": agent.obs_dim,
            "act_low": agent.actor.bias.cpu() - agent.actor.scale.cpu(),
            "act_high": agent.actor.bias.cpu() + agent.actor.scale.cpu(),
            "widths": agent.widths(), "state": agent.state_dict(), "dense_params": agent.dense_params,
            "loss_scale": {k: v.cpu() for k, v in agent.loss_scale.items()}}


def save_agent(agent: Agent, path: str) -> None:
    write_atomically(path, lambda f: torch.save(agent_payload(agent), f))


def read_checkpoint(path: str, fmt: str = FORMAT) -> dict:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist.") from None
    except Exception:
        raise UserError(f"{path} is not a readable xinet checkpoint (cut short or another kind of file).") from None
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        kind = KINDS.get(payload.get("format")) if isinstance(payload, dict) else None
        raise UserError(f"{path} is {kind or 'not an xinet checkpoint'}; this needs {KINDS[fmt]}.")
    return payload


def load_agent(path: str, device: torch.device | str = "cpu", payload: Optional[dict] = None) -> Agent:
    """Rebuild a saved agent (agent.pt, or the `payload` read from it), pruned architecture included."""
    payload = payload or read_checkpoint(path)
    known = {f.name for f in dataclasses.fields(Config)}
    cfg = Config(**{k: v for k, v in payload["config"].items() if k in known})
    agent = Agent(cfg, payload["obs_dim"], payload["act_low"].numpy(), payload["act_high"].numpy(),
                  widths=payload["widths"], device=device)
    try:
        agent.load_state_dict(payload["state"])
    except RuntimeError:
        raise UserError(f"{path} does not match the architecture it describes.") from None
    agent.loss_scale = {k: v.to(device) for k, v in payload.get("loss_scale", {}).items()}
    agent.dense_params = payload.get("dense_params", agent.dense_params)  # P(1) of the unpruned agent
    return agent


def rng_states(env: gym.Env) -> dict:
    """Every random number generator a run draws from: torch (CPU, CUDA), numpy, the env's own
    (reset noise) and its action space's (the random warm-up actions)."""
    _, key, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss],
            "env": env.unwrapped.np_random.bit_generator.state,
            "action_space": env.action_space.np_random.bit_generator.state}


def set_rng_states(env: gym.Env, states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    key, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state(("MT19937", key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    env.unwrapped.np_random.bit_generator.state = states["env"]
    env.action_space.np_random.bit_generator.state = states["action_space"]


def save_resume(path: str, agent: Agent, buffer: ReplayBuffer, env: gym.Env, loop: dict) -> None:
    """Everything a killed run needs to go on as if it had not stopped: the agent, every
    optimizer's moments, the replay buffer's filled rows and position, the loop's counters and
    every RNG. The environment itself starts a new episode on resume."""
    payload = {"format": RESUME_FORMAT, "agent": agent_payload(agent),
               "optimizers": {k: opt.state_dict() for k, opt in agent.opts.items()},
               "buffer": {"rows": buffer.data[:buffer.size].to("cpu", copy=True), "pos": buffer.pos},
               "loop": loop, "rng": rng_states(env)}
    write_atomically(path, lambda f: torch.save(payload, f))


def load_resume(path: str, env: gym.Env, device: torch.device) -> tuple[Agent, ReplayBuffer, dict]:
    """The inverse of save_resume: (agent, buffer, loop counters), and the RNGs set as saved."""
    payload = read_checkpoint(path, RESUME_FORMAT)
    agent = load_agent(path, device, payload["agent"])
    for k, opt in agent.opts.items():
        opt.load_state_dict(payload["optimizers"][k])
    rows = payload["buffer"]["rows"]
    buffer = ReplayBuffer(agent.obs_dim, agent.act_dim, agent.cfg.buffer_size, device)
    buffer.data[:len(rows)] = rows.to(device)
    buffer.pos, buffer.size = payload["buffer"]["pos"], len(rows)
    buffer.count.fill_(buffer.size)
    set_rng_states(env, payload["rng"])
    return agent, buffer, payload["loop"]


# ----------------------------------------------------------------------------------------------
# Environments and evaluation
# ----------------------------------------------------------------------------------------------

def make_env(env_id: str, **kw) -> gym.Env:
    """gym.make, refusing in one sentence an id it does not know and a task SAC cannot learn."""
    try:
        env = gym.make(env_id, **kw)
    except Exception as e:  # an unknown id, a missing simulator, a broken install
        raise UserError(f"cannot make environment {env_id!r} ({type(e).__name__}: {e}).") from None
    act, obs = env.action_space, env.observation_space
    why = (f"has a {type(act).__name__} action space; SAC needs a continuous (Box) one" if not isinstance(act, gym.spaces.Box)
           else "has an unbounded action space; SAC's tanh policy needs bounds" if not np.isfinite([act.low, act.high]).all()
           else "needs a flat Box observation space" if not isinstance(obs, gym.spaces.Box) or len(obs.shape) != 1
           else None)
    if why:
        env.close()
        raise UserError(f"{env_id} {why}.")
    return env


def evaluate(agent: Agent, env: gym.Env, episodes: int, seed: int, frames: Optional[list] = None) -> np.ndarray:
    """Returns of `episodes` episodes of the deterministic policy (mean gates); with `frames`,
    every rendered frame of them is appended to it (env made with render_mode="rgb_array")."""
    returns = []
    for k in range(episodes):
        obs, _ = env.reset(seed=seed + k)
        done, total = False, 0.0
        while not done:
            if frames is not None:
                frames.append(env.render())
            obs, reward, terminated, truncated, _ = env.step(agent.act(obs))
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    if frames is not None:
        frames.append(env.render())
    return np.array(returns)


# ----------------------------------------------------------------------------------------------
# What a run shows: videos, TensorBoard, the progress plot
# ----------------------------------------------------------------------------------------------

def make_video_env(env_id: str) -> gym.Env:
    """The environment that renders videos, off-screen (MUJOCO_GL=egl unless set); checked with
    one frame, so a missing renderer ends in one sentence before any training."""
    os.environ.setdefault("MUJOCO_GL", "egl")  # read when MuJoCo is first imported: before any env
    if env_id not in gym.registry:
        make_env(env_id)  # the environment's own error
    try:
        env = gym.make(env_id, render_mode="rgb_array")
        env.reset(seed=0)
        assert env.render() is not None, "no frame"
    except Exception as e:
        raise UserError(f"cannot render {env_id} off-screen ({type(e).__name__}: {e}); set MUJOCO_GL=egl or "
                        "MUJOCO_GL=osmesa (with that library installed), or drop --capture-video.") from None
    return env


def record_video(agent: Agent, env: gym.Env, path: str, seed: int) -> int:
    """One deterministic episode as an mp4 (imageio's ffmpeg plugin); returns its frame count."""
    import imageio
    frames = []
    evaluate(agent, env, 1, seed, frames)
    with user_path(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        imageio.mimwrite(path, frames, fps=env.metadata.get("render_fps", 30), macro_block_size=1)
    return len(frames)


def tensorboard_row(writer, row: dict, agent: Agent) -> None:
    """Every progress.csv column as a scalar, and per network the histogram of surviving theta."""
    for key, value in row.items():
        if key != "step" and math.isfinite(value):
            writer.add_scalar(key, value, row["step"])
    for name, net in agent.nets.items():
        theta = torch.cat([layer.theta.detach().cpu() for layer in gated_layers(net)] or [torch.zeros(0)])
        if (theta > 0).any():
            writer.add_histogram(f"theta/{name}", theta[theta > 0], row["step"])
    writer.flush()


def plot_progress(run_dirs: list[str], path: str) -> str:
    """Evaluation and training return, parameters (% of dense) and FLOPs per action against
    steps, for one run or several on one figure; each pruning event a tick (pruning.csv)."""
    from matplotlib.figure import Figure  # no pyplot: a notebook's own backend stays as it is
    fig = Figure(figsize=(16, 4.2))
    axes = fig.subplots(1, 3)
    for k, run in enumerate(run_dirs):
        with user_path(os.path.join(run, "progress.csv"), "read") as csv_path, open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
        col = lambda key: np.array([float(r.get(key) or "nan") for r in rows])
        step, label, color = col("step"), os.path.basename(os.path.normpath(run)), f"C{k}"
        axes[0].plot(step, col("eval_return"), color=color, marker=".", label=f"{label}: evaluation")
        axes[0].plot(step, col("train_return"), color=color, ls="--", label=f"{label}: training")
        axes[1].plot(step, 100 * col("params") / col("dense_params"), color=color, marker=".", label=label)
        axes[2].plot(step, col("flops_per_action"), color=color, marker=".", label=label)
        if os.path.exists(os.path.join(run, "pruning.csv")):
            with open(os.path.join(run, "pruning.csv"), newline="") as f:
                events = [int(r["step"]) for r in csv.DictReader(f)]
            for ax in axes[1:]:
                ax.plot(events, np.zeros(len(events)), "|", color=color, ms=12, transform=ax.get_xaxis_transform())
    for ax, title in zip(axes, ("return", "parameters, % of dense (ticks: pruning events)", "FLOPs per action")):
        ax.set(title=title, xlabel="environment steps")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with user_path(path):
        fig.savefig(path, dpi=100)
    return path


class ProgressLog:
    """A CSV of one row per event (progress.csv, pruning.csv), rewritten whole and atomically at each
    row; its header is the union of the rows' keys, so a resumed run may log more columns. Resuming
    from the checkpoint of step `after` keeps the rows up to it and drops any written after it."""

    def __init__(self, path: str, after: Optional[int] = None):
        self.path, self.fields, self.rows = path, [], []
        if after is not None and os.path.exists(path):  # a run stopped before its first row has none
            with user_path(path, "read"), open(path, newline="") as f:
                reader = csv.DictReader(f)
                self.rows = [row for row in reader if int(row["step"]) <= after]
            self.fields = reader.fieldnames or []
            self.write()

    def write(self, row: Optional[dict] = None) -> None:
        self.rows += [row] if row else []
        text = io.StringIO()
        w = csv.DictWriter(text, fieldnames=list(dict.fromkeys([*self.fields, *(k for r in self.rows for k in r)])))
        w.writeheader()
        w.writerows(self.rows)
        write_atomically(self.path, lambda f: f.write(text.getvalue().encode()))


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------

def pick_device(name: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def max_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux and macOS)."""
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def build_agent(cfg: Config, env: gym.Env, device: torch.device) -> Agent:
    """A fresh agent for `env`, or with --arch-from the architecture of that checkpoint, dense."""
    obs_dim, low, high = env.observation_space.shape[0], env.action_space.low, env.action_space.high
    widths = None
    if cfg.arch_from:
        payload = read_checkpoint(cfg.arch_from)
        if payload["obs_dim"] != obs_dim or len(payload["act_low"]) != len(low):
            raise UserError(f"{cfg.arch_from} was trained on other observation/action sizes than {cfg.env}.")
        if payload["config"]["ofenet"] != cfg.ofenet:
            raise UserError(f"{cfg.arch_from} and this run disagree on --no-ofenet.")
        widths, cfg.gates = payload["widths"], False
    return Agent(cfg, obs_dim, low.astype(np.float64), high.astype(np.float64), widths=widths, device=device)


class CudaGraph:
    """Runs `fn()` on each call; on a GPU, as a recorded CUDA graph replayed with one launch.

    An update is a thousand small kernels; launching them one by one from Python costs more
    than running them. Recording needs `fn` to touch the same tensors every call: the buffer
    and parameters are preallocated, the fill level and gamma live in device tensors, and
    there is no host sync inside. One recording is kept per `key` and set of layers whose gates
    are sure, all dropped when the agent's architecture changes (pruning replaced the
    parameters); a new key runs `fn` once eagerly and records it. Every call runs `fn` exactly
    once. With `enabled` False (a CPU), it is a plain call.
    """

    def __init__(self, fn: Callable[[], object], agent: Agent, enabled: bool):
        self.fn, self.agent, self.enabled, self.arch, self.graphs = fn, agent, enabled, None, {}

    def __call__(self, key=None) -> None:
        if not self.enabled:
            return self.fn()
        arch = tuple(layer.out_features for layer in self.agent.gated)
        key = (key, tuple(layer.sure for layer in self.agent.gated))
        if arch != self.arch:
            self.graphs, self.arch = {}, arch  # frees the old recordings' memory
        if key in self.graphs:
            return self.graphs[key].replay()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # this call's work, eagerly (also warms up lazy state)
            self.fn()
        torch.cuda.current_stream().wait_stream(side)
        self.graphs[key] = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graphs[key]):  # recorded, not run
            self.fn()


class Learner:
    """The training loop's update: `learner(gates_on, gamma)` runs Eq. 3's step on a fresh
    minibatch (a gate step with `gates_on`), as a CUDA graph on a GPU. After a gate step it
    marks the layers whose gates are sure."""

    def __init__(self, agent: Agent, buffer: ReplayBuffer, batch_size: int, graphs: bool):
        self.agent, self.gates_on = agent, False
        self.strength = torch.zeros((), device=buffer.device)  # gamma, read by the recorded graph
        self.graph = CudaGraph(lambda: update(agent, buffer.sample(batch_size), self.gates_on, self.strength),
                               agent, graphs)
        agent.mark_sure_gates()

    def __call__(self, gates_on: bool, strength: float) -> None:
        self.gates_on = gates_on
        self.strength.fill_(strength)
        self.graph(gates_on)
        if gates_on:
            self.agent.mark_sure_gates()


class Explorer:
    """The training loop's actions a ~ pi(.|o) for one observation; on a GPU the policy's
    forward pass is one CUDA graph replay instead of some forty kernel launches."""

    def __init__(self, agent: Agent, graphs: bool):
        self.obs = torch.zeros(agent.obs_dim, device=agent.log_alpha.device)  # the graph's input,
        self.action: Optional[torch.Tensor] = None                              # and its output
        self.graph = CudaGraph(lambda: setattr(self, "action", agent.policy(self.obs, deterministic=False)),
                               agent, graphs)

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        self.obs.copy_(torch.as_tensor(obs, dtype=torch.float32))
        self.graph()
        return self.action.cpu().numpy()


def env_step(env: gym.Env, buffer: ReplayBuffer, obs: np.ndarray, action: np.ndarray):
    """Act, store the transition; returns (next observation, reward, episode over)."""
    next_obs, reward, terminated, truncated, _ = env.step(action)
    buffer.add(obs, action, reward, next_obs, terminated)
    return next_obs, float(reward), terminated or truncated


@contextlib.contextmanager
def stop_on_signals():
    """Yields [signal]: SIGINT or SIGTERM sets it, and the loop then finishes its step, saves the
    run and stops (`Stopped`). A second signal interrupts at once; the atomic writes keep every
    file whole, the old one or the new. Outside the main thread (which alone may), it does nothing."""
    stop = [0]

    def handler(signum, frame):
        if stop[0]:
            raise KeyboardInterrupt
        stop[0] = signum
    try:
        old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:
        old = {}
    try:
        yield stop
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def divergence(agent: Agent, step: int, first_update: int, returns: Optional[np.ndarray] = None) -> Optional[str]:
    """What of the run went NaN or inf, and the flags to try, or None: the device flags of every
    update since `first_update` (read here, once per block), every parameter, the returns."""
    bad = [name for name, good in zip(HEALTH, agent.finite.tolist()) if not good]
    param = next((name for name, p in agent.named_parameters() if not bool(torch.isfinite(p).all())), None)
    if bad:
        what, flags = f"at step {first_update + int(agent.finite_updates):,} {' and '.join(bad)}", {HEALTH[n] for n in bad}
    elif param:
        what, flags = f"by step {step:,} the parameter {param}", {"--lr", "--critic-lr"}
    elif returns is not None and not np.isfinite(returns).all():
        what, flags = f"at step {step:,} the evaluation return", {"--lr"}
    else:
        return None
    return f"the run diverged: {what} went non-finite (NaN or inf); try a smaller {' or '.join(sorted(flags))}"


def start(cfg: Config, env: gym.Env, device: torch.device, resume: bool) -> tuple[Agent, ReplayBuffer, dict, np.ndarray]:
    """A new run, seeded, or with `resume` the run in cfg.out as its last checkpoint left it (the
    interrupted episode is dropped: the environment starts a new one). Writes RUN_DIR/config.json."""
    if resume:
        path = os.path.join(cfg.out, "resume.pt")
        agent, buffer, loop = load_resume(path, env, device)
        fixed = lambda c: {k: v for k, v in dataclasses.asdict(c).items() if k not in (*RESUMABLE, "out")}
        if fixed(agent.cfg) != fixed(cfg):
            raise UserError(f"{path} belongs to another run than {cfg.out}/config.json.")
        if loop["step"] >= cfg.total_steps:
            raise UserError(f"the run in {cfg.out} has reached its {loop['step']:,} steps; "
                            "a larger --total-steps extends it.")
        agent.cfg, (obs, _) = cfg, env.reset()
    else:
        if any(os.path.exists(os.path.join(cfg.out, f)) for f in ("agent.pt", "resume.pt")):  # never written over
            raise UserError(f"{cfg.out} holds a run already; `--resume {cfg.out}` goes on with it, or choose another --out.")
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        env.action_space.seed(cfg.seed)
        agent = build_agent(cfg, env, device)
        buffer = ReplayBuffer(agent.obs_dim, agent.act_dim, cfg.buffer_size, device)
        loop = {"step": 0, "pruned": 0, "train_returns": [], "last_eval": float("nan"), "time": 0.0}
        obs, _ = env.reset(seed=cfg.seed)
    with user_path(os.path.join(cfg.out, "config.json")) as path:
        os.makedirs(cfg.out, exist_ok=True)
        with open(path, "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)
    return agent, buffer, loop, obs


def train(cfg: Config, on_eval: Optional[Callable[[int, "Agent"], None]] = None, resume: bool = False,
          stop: Optional[list] = None) -> str:
    """Run XiNet (or a baseline) as configured; returns the run directory. `on_eval(step, agent)`
    is called after every evaluation (the tutorial records theta with it). With `resume`, the
    run in `cfg.out` goes on from its last checkpoint (see `resume_config`). Once `stop[0]` is
    set (`stop_on_signals`), the run saves where it stands and raises `Stopped`. A run that
    diverges stops (`divergence`) before anything non-finite reaches a file."""
    cfg = validate(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    cfg.out = run_dir = cfg.out or os.path.join("runs", f"{cfg.env}__{cfg.seed}__{time.strftime('%Y%m%d-%H%M%S')}")
    video_env = make_video_env(cfg.env) if cfg.capture_video else None  # before MuJoCo's first import
    env, eval_env = make_env(cfg.env), make_env(cfg.env)
    agent, buffer, loop, obs = start(cfg, env, device, resume)
    after = loop["step"] if resume else None
    log, prunings = ProgressLog(os.path.join(run_dir, "progress.csv"), after), ProgressLog(os.path.join(run_dir, "pruning.csv"), after)
    if cfg.tensorboard:
        from torch.utils.tensorboard import SummaryWriter
        board = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=loop["step"] + 1 if resume else None)
    print(f"xinet: {cfg.env} on {device}, {agent.sizes()['params']:,} parameters, run dir {run_dir}"
          + (f", resumed at step {loop['step']:,}" if resume else ""), flush=True)

    graphs = device.type == "cuda" and cfg.cuda_graphs
    learner, explore = Learner(agent, buffer, cfg.batch_size, graphs), Explorer(agent, graphs)
    gate_start = max(cfg.prune_start, cfg.learning_starts)
    episode_return, train_returns, last_eval = 0.0, loop["train_returns"], loop["last_eval"]
    t_start = time.perf_counter() - loop["time"]  # the run's clock goes on across resumes
    t_line = t_row = time.perf_counter()
    steps_at_line = steps_at_row = loop["step"]
    first_update = max(loop["step"], cfg.learning_starts) + 1  # the agent's device counters start here
    stop = stop or [0]

    def guard(step: int, returns: Optional[np.ndarray] = None) -> None:
        why = divergence(agent, step, first_update, returns)
        if why:
            kept = f"{run_dir}/agent.pt and resume.pt stay those of step {loop['step']:,}" if loop["step"] else "no checkpoint was written"
            raise UserError(f"{why}; {kept}.")

    def checkpoint(step: int, returns: Optional[np.ndarray] = None, row: Optional[dict] = None) -> None:
        guard(step, returns)  # nothing non-finite is ever written over a good checkpoint
        if row is not None:
            log.write(row)
        save_agent(agent, os.path.join(run_dir, "agent.pt"))
        loop.update(step=step, last_eval=last_eval, time=time.perf_counter() - t_start)
        save_resume(os.path.join(run_dir, "resume.pt"), agent, buffer, env, loop)

    if resume and loop.get("pretrained", cfg.pretrain_steps) < cfg.pretrain_steps:  # stopped while pre-training
        loop["pretrained"] = pretrain_ofenet(agent, buffer, cfg, graphs, loop["pretrained"], stop)
    for step in range(loop["step"] + 1, cfg.total_steps + 1):
        action = env.action_space.sample() if step <= cfg.learning_starts else explore(obs)
        if not np.isfinite(action).all():
            guard(step)  # the device flags name the network at fault, if they can
            raise UserError(f"the run diverged: at step {step:,} the actor's action went non-finite; try a smaller --lr.")
        obs, reward, done = env_step(env, buffer, obs, action)
        if not (np.isfinite(obs).all() and math.isfinite(reward)):
            raise UserError(f"at step {step:,} {cfg.env} returned a non-finite observation or reward; "
                            f"the last good checkpoint is of step {loop['step']:,}.")
        episode_return += reward
        if done:
            train_returns.append(episode_return)
            obs, _ = env.reset()
            episode_return = 0.0

        if step == cfg.learning_starts and agent.ofenet is not None:
            loop["pretrained"] = pretrain_ofenet(agent, buffer, cfg, graphs, 0, stop)
        if step > cfg.learning_starts:
            gates_on = cfg.gates and step > gate_start and bool(agent.gated)
            gate_now = gates_on and (step - gate_start) % cfg.gate_every == 0
            learner(gate_now, cfg.prune_strength * min(1.0, (step - gate_start) / max(cfg.prune_ramp, 1)))
            if gates_on and (step - gate_start) % cfg.prune_every == 0:
                removed = agent.prune()
                if removed:
                    loop["pruned"] += removed
                    prunings.write({"step": step, "units_removed": removed, "params": agent.sizes()["params"]})

        if step % cfg.eval_every == 0 or step == cfg.total_steps:
            train_rate = (step - steps_at_row) / (time.perf_counter() - t_row)  # evaluation excluded
            returns = evaluate(agent, eval_env, cfg.eval_episodes, seed=cfg.seed + 10_000)
            last_eval = float(returns.mean())
            sizes = agent.sizes()
            alive = {k: sizes.pop(k) for k in list(sizes) if k.startswith("alive_")}
            row = {"step": step, "eval_return": last_eval, "eval_return_std": float(returns.std()),
                   "train_return": float(np.mean(train_returns)) if train_returns else float("nan"),
                   **sizes, "alpha": agent.log_alpha.exp().item(),
                   **{f"loss_scale_{k}": agent.loss_scale[k].item() if k in agent.loss_scale else float("nan")
                      for k in agent.nets}, **alive,
                   "steps_per_sec": train_rate, "time": time.perf_counter() - t_start, "max_rss_mb": max_rss_mb()}
            train_returns.clear()
            checkpoint(step, returns, row)
            plot_progress([run_dir], os.path.join(run_dir, "progress.png"))
            if cfg.tensorboard:
                tensorboard_row(board, row, agent)
            if on_eval is not None:
                on_eval(step, agent)
            t_row, steps_at_row = time.perf_counter(), step
        if video_env is not None and (step % cfg.video_every == 0 if cfg.video_every else
                                      step % cfg.eval_every == 0 or step == cfg.total_steps):
            record_video(agent, video_env, os.path.join(run_dir, "videos", f"step_{step}.mp4"), cfg.seed + 10_000)
        if stop[0]:
            checkpoint(step)
            raise Stopped(stop[0], step)
        if step % cfg.log_every == 0:
            guard(step)
            now, sizes = time.perf_counter(), agent.sizes()
            rate = (step - steps_at_line) / (now - t_line)
            t_line, steps_at_line = now, step
            units = sum(v for k, v in sizes.items() if k.startswith("alive_"))
            print(f"step {step:>8,}  {rate:6.1f} steps/s  eta {(cfg.total_steps - step) / max(rate, 1e-9) / 60:6.1f} min  "
                  f"eval {last_eval:8.1f}  units {units:5d}  params {sizes['params']:>9,}  pruned {loop['pruned']}", flush=True)
    for e in (env, eval_env, video_env, board if cfg.tensorboard else None):
        if e is not None:
            e.close()
    if not cfg.keep_resume:
        os.remove(os.path.join(run_dir, "resume.pt"))
    return run_dir


def pretrain_ofenet(agent: Agent, buffer: ReplayBuffer, cfg: Config, graphs: bool = False, done: int = 0,
                    stop: Sequence = (0,)) -> int:
    """OFENet's own warm-up: `pretrain_steps` auxiliary updates on the random-action data, from
    update `done` on; returns the updates done (fewer if `stop` was set, to go on later)."""
    losses = []

    def step():
        obs, action, _, next_obs, _ = buffer.sample(cfg.batch_size)
        losses[:] = [update_ofenet(agent, obs, action, next_obs, gates_on=False)]

    pretrain, t0, k = CudaGraph(step, agent, graphs), time.perf_counter(), done
    for layer in agent.gated:  # no gate steps yet: theta is a constant
        layer.theta.requires_grad_(False)
    for k in range(done + 1, cfg.pretrain_steps + 1):
        pretrain()
        if k % cfg.log_every == 0 or k == cfg.pretrain_steps:
            loss = float(losses[0])
            if not math.isfinite(loss):
                raise UserError(f"OFENet's pre-training diverged: at update {k:,} its auxiliary loss went non-finite; "
                                "try a smaller --lr.")
            print(f"pretrain {k:>7,}/{cfg.pretrain_steps:,}  aux loss {loss:.5f}  "
                  f"{(k - done) / (time.perf_counter() - t0):6.1f} updates/s", flush=True)
        if stop[0]:
            break
    for layer in agent.gated:
        layer.theta.requires_grad_(True)
    return k


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

def field_docs(cls) -> dict[str, str]:
    """The docstring under each dataclass field (they become the --help texts)."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    return {a.target.id: b.value.value for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr)
            and isinstance(getattr(b, "value", None), ast.Constant)}


def parse_args(argv=None) -> tuple[Config, set[str], argparse.Namespace]:
    """(config, the fields given on the command line, the other options: --eval, --plot, --resume)."""
    parser = argparse.ArgumentParser(prog="xinet.py", description=__doc__.split("\n\n")[0])
    docs = field_docs(Config)
    for f in dataclasses.fields(Config):  # default None: a flag not given is told from one given
        help = f"{docs[f.name]} (default: {f.default})"
        if f.type in ("bool", bool):
            parser.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, help=help)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            parser.add_argument(flag(f.name), type=kind, choices=CHOICES.get(f.name), help=help)
    parser.add_argument("--eval", metavar="CKPT", default=None,
                        help="load a saved agent, evaluate it and print its return and size")
    parser.add_argument("--plot", metavar="RUN", nargs="+", default=None,
                        help="plot these runs' progress on one figure (--out: the PNG; default progress.png)")
    parser.add_argument("--resume", metavar="RUN_DIR", default=None,
                        help=f"continue the run in RUN_DIR from its last checkpoint; only {', '.join(map(flag, RESUMABLE))} may change")
    args = vars(parser.parse_args(argv))
    other = argparse.Namespace(**{k: args.pop(k) for k in ("eval", "resume", "plot")})
    given = {k: v for k, v in args.items() if v is not None}
    return Config(**given), set(given), other


def resume_config(run_dir: str, cli: Config, given: set[str]) -> Config:
    """The config in force of the run in `run_dir`, with the flags that may change on a resume
    (RESUMABLE) taken from the command line; any other flag that contradicts it is refused."""
    path = os.path.join(run_dir, "config.json")
    try:
        with open(path) as f:
            saved = json.load(f)
        cfg = Config(**saved)
    except OSError as e:
        raise UserError(f"cannot resume {run_dir}: cannot read {path} ({e.strerror}).") from None
    except (ValueError, TypeError):
        raise UserError(f"cannot resume {run_dir}: {path} is not an xinet run config.") from None
    if "out" in given and os.path.abspath(cli.out) != os.path.abspath(run_dir):
        raise UserError(f"--resume goes on in {run_dir}; --out {cli.out} contradicts it.")
    for name in sorted(given - {"out"}):
        if name in RESUMABLE:
            setattr(cfg, name, getattr(cli, name))
        elif getattr(cli, name) != saved[name]:
            raise UserError(f"{flag(name)} {getattr(cli, name)} contradicts the run in {run_dir} ({saved[name]}); "
                            f"a resumed run may change only {', '.join(map(flag, RESUMABLE))}.")
    cfg.out = run_dir
    return cfg


def evaluate_checkpoint(cfg: Config, path: str, env_id: str = "") -> None:
    """--eval: the saved agent on its own environment, or on `env_id` (--env, e.g. a v4 agent on v5)."""
    device = pick_device(cfg.device)
    agent = load_agent(path, device)
    env_id = env_id or agent.cfg.env
    video_env = make_video_env(env_id) if cfg.capture_video else None  # before MuJoCo's first import
    env = make_env(env_id)
    if env.observation_space.shape[0] != agent.obs_dim or env.action_space.shape[0] != agent.act_dim:
        raise UserError(f"{path} does not fit {env_id}'s observations and actions.")
    returns = evaluate(agent, env, cfg.eval_episodes, seed=cfg.seed + 10_000)
    sizes = agent.sizes()
    print(f"{env_id}: return {returns.mean():.1f} +- {returns.std():.1f} over {len(returns)} episodes; "
          f"{sizes['params']:,} parameters, {sizes['flops_per_action']:,} FLOPs per action, "
          f"units { {k[6:]: v for k, v in sizes.items() if k.startswith('alive_')} }")
    if cfg.capture_video:
        video = cfg.out or os.path.join(os.path.dirname(path), "videos", "eval.mp4")
        frames = record_video(agent, video_env, video, cfg.seed + 10_000)
        print(f"{video}: the first episode, {frames} frames")


def main(argv=None) -> int:
    cfg, given, other = parse_args(argv)
    try:
        if other.eval:
            validate(cfg)
            evaluate_checkpoint(cfg, other.eval, cfg.env if "env" in given else "")
        elif other.plot:
            print(plot_progress(other.plot, cfg.out or "progress.png"))
        else:
            if other.resume:
                cfg = resume_config(other.resume, cfg, given)
            with stop_on_signals() as stop:
                train(cfg, resume=bool(other.resume), stop=stop)
    except UserError as e:
        print(f"xinet: error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:
        signum, step = e.args
        print(f"xinet: stopped by {signal.Signals(signum).name} at step {step:,}, saved; "
              f"`python xinet.py --resume {cfg.out}` goes on from there.", file=sys.stderr)
        return 128 + signum
    except KeyboardInterrupt:
        training = cfg.out and not other.eval
        hint = f"; `python xinet.py --resume {cfg.out}` goes on from the last checkpoint" if training else ""
        print(f"xinet: interrupted{hint}.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
