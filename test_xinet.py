"""Tests of xinet.py: each checks a property the method relies on. Run: python -m pytest -q"""
import contextlib
import csv
import io
import itertools
import math
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import deploy
import xinet
from xinet import Agent, Config, GatedLinear, ReplayBuffer

HERE = os.path.dirname(os.path.abspath(__file__))
OBS, ACT = 11, 3  # Hopper's sizes


def small_config(**kw) -> Config:
    base = dict(ofe_layers=2, ofe_units=6, hidden=16)
    base.update(kw)
    return xinet.validate(Config(**base))


def small_agent(seed=0, **kw) -> Agent:
    torch.manual_seed(seed)
    return Agent(small_config(**kw), OBS, -np.ones(ACT), np.ones(ACT))


def random_buffer(n=400, seed=0, device="cpu") -> ReplayBuffer:
    rng = np.random.default_rng(seed)
    buf = ReplayBuffer(OBS, ACT, n, torch.device(device))
    for i in range(n):
        buf.add(rng.normal(size=OBS), rng.uniform(-1, 1, ACT), rng.normal(), rng.normal(size=OBS), i % 37 == 0)
    return buf


def set_binary_gates(agent: Agent, p_keep: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in agent.gated:
            keep = (torch.rand(layer.theta.shape, generator=g) < p_keep).float()
            keep[0] = 1.0  # every layer keeps a unit, so the MLP rule does not intervene
            layer.theta.copy_(keep)
        for lt, lo in zip(xinet.gated_layers(agent.critic_target), xinet.gated_layers(agent.critic)):
            lt.theta.copy_(lo.theta)


# ---------------------------------------------------------------------------------------------
# Gates
# ---------------------------------------------------------------------------------------------

def constant_layer(theta, **kw) -> GatedLinear:
    """A gated layer whose pre-gate output is 1 for every unit, whatever the input."""
    layer = GatedLinear(2, len(theta), **kw)
    with torch.no_grad():
        layer.linear.weight.zero_()
        layer.linear.bias.fill_(1.0)
        layer.theta.copy_(torch.tensor(theta))
    return layer


def test_sampled_gates_have_mean_theta():
    theta = [0.1, 0.5, 0.9, 1.0, 0.0]
    layer = constant_layer(theta).train()
    torch.manual_seed(0)
    y = layer(torch.randn(40_000, 2)).detach()
    assert set(y.unique().tolist()) <= {0.0, 1.0}
    se = np.sqrt(np.array(theta) * (1 - np.array(theta)) / 40_000) + 1e-9
    assert np.all(np.abs(y.mean(0).numpy() - theta) < 5 * se)
    assert y[:, 3].eq(1).all() and y[:, 4].eq(0).all()  # theta at 0 or 1: deterministic
    assert not torch.equal(y[:, 1], y[:, 2])  # drawn per unit


def test_mean_gate_multiplies_by_theta():
    layer = GatedLinear(4, 3, batch_norm=True, activation=F.silu)
    with torch.no_grad():
        layer.theta.copy_(torch.tensor([0.25, 0.0, 0.8]))
    layer.eval()
    x = torch.randn(10, 4)
    plain = F.silu(layer.bn(layer.linear(x)))
    torch.testing.assert_close(layer(x), plain * layer.theta)


def test_pathwise_gradient_of_theta():
    torch.manual_seed(1)
    layer = GatedLinear(3, 5, activation=torch.tanh, estimator="pathwise").train()
    with torch.no_grad():
        layer.theta.copy_(torch.tensor([0.3, 0.6, 0.9, 0.5, 0.7]))
    x, c = torch.randn(16, 3), torch.randn(16, 5)
    (layer(x) * c).sum().backward()
    h = torch.tanh(layer.linear(x)).detach()
    torch.testing.assert_close(layer.theta.grad, (h * c).sum(0))  # d/dxi of the drawn network
    flip_layer = GatedLinear(3, 5, activation=torch.tanh, estimator="flip").train()
    (flip_layer(x) * c).sum().backward()
    h = torch.tanh(flip_layer.linear(x)).detach()
    torch.testing.assert_close(flip_layer.gate.grad, h * c)  # kept per example for flip_estimate


def test_theta_is_projected_onto_unit_interval():
    agent = small_agent(gate_lr=0.3)
    buf = random_buffer()
    for _ in range(5):
        xinet.update(agent, buf.sample(32), gates_on=True, strength=1e4)  # cost dominates
    thetas = torch.cat([t.detach() for t in [layer.theta for layer in agent.gated]])
    assert thetas.min() >= 0 and thetas.max() <= 1
    assert (thetas == 0).any()  # the projection lands exactly on 0
    for lt, lo in zip(xinet.gated_layers(agent.critic_target), xinet.gated_layers(agent.critic)):
        assert torch.equal(lt.theta, lo.theta)  # target gates mirror the online ones
    for layer in agent.gated:
        if layer.min_units:
            assert (layer.theta > 0).sum() >= 1  # an MLP hidden layer keeps a unit


# ---------------------------------------------------------------------------------------------
# Gradient estimators against exact enumeration of all gate patterns
# ---------------------------------------------------------------------------------------------

THETA = torch.tensor([0.3, 0.6, 0.85, 0.5])


def tiny_problem(estimator):
    torch.manual_seed(3)
    layer = GatedLinear(3, 4, activation=torch.tanh, estimator=estimator)
    with torch.no_grad():
        layer.theta.copy_(THETA)
    readout = torch.nn.Linear(4, 1)
    x, target = torch.randn(8, 3), torch.randn(8)
    return layer, readout, x, target


def exact_gradient(layer, readout, x, per_example_loss):
    """dE[L]/dtheta with E over all 2^4 gate patterns of every example (independent)."""
    theta = layer.theta.detach().clone().requires_grad_(True)
    h = torch.tanh(layer.linear(x)).detach()  # (B, 4)
    patterns = torch.tensor(list(itertools.product([0.0, 1.0], repeat=4)))  # (16, 4)
    prob = (patterns * theta + (1 - patterns) * (1 - theta)).prod(-1)  # (16,)
    with torch.no_grad():
        y = readout(h[:, None, :] * patterns[None]).squeeze(-1)  # (B, 16)
    expected = (per_example_loss(y) * prob).sum(-1).mean()
    (grad,) = torch.autograd.grad(expected, theta)
    return grad


def estimates(layer, readout, x, per_example_loss, draws):
    layer.train()
    out = []
    for _ in range(draws):
        loss_fn = lambda: per_example_loss(readout(layer(x)).squeeze(-1))[:, None]
        losses = loss_fn()
        layer.theta.grad = None
        losses.mean().backward()
        if layer.estimator == "flip":
            out.append(xinet.flip_estimate([[layer]], losses, loss_fn)[layer])
        else:
            out.append(layer.theta.grad.clone())
    g = torch.stack(out)
    return g.mean(0), g.std(0) / math.sqrt(draws)


def mse(target):
    return lambda y: (y - target.reshape(-1, *([1] * (y.dim() - 1)))) ** 2


def test_flip_estimator_is_unbiased():
    torch.manual_seed(0)
    layer, readout, x, target = tiny_problem("flip")
    exact = exact_gradient(layer, readout, x, mse(target))
    mean, se = estimates(layer, readout, x, mse(target), draws=6000)
    assert torch.all((mean - exact).abs() < 4.5 * se + 1e-6), (mean, exact, se)


def test_pathwise_control_variate_lowers_the_flip_variance():
    """Called before the backward pass, flip_estimate has no control variate (plain flips); on
    the same draws and flips the control variate cuts the variance several times."""
    layer, readout, x, target = tiny_problem("flip")
    loss_fn = lambda: mse(target)(readout(layer(x)).squeeze(-1))[:, None]
    layer.train()
    with_cv, plain = [], []
    for k in range(2000):
        losses = loss_fn()
        torch.manual_seed(k)  # the same j(i) for both
        plain.append(xinet.flip_estimate([[layer]], losses, loss_fn)[layer])
        losses.mean().backward()
        torch.manual_seed(k)
        with_cv.append(xinet.flip_estimate([[layer]], losses, loss_fn)[layer])
    exact = exact_gradient(layer, readout, x, mse(target))
    for g in (plain, with_cv):
        g = torch.stack(g)
        assert torch.all((g.mean(0) - exact).abs() < 4.5 * g.std(0) / math.sqrt(len(g)) + 1e-6)
    ratio = torch.stack(plain).var(0) / torch.stack(with_cv).var(0)
    assert torch.all(ratio > 4), ratio


def test_pathwise_is_exact_when_loss_is_linear_in_each_gate():
    torch.manual_seed(0)
    layer, readout, x, _ = tiny_problem("pathwise")
    linear = lambda y: 3.0 * y
    exact = exact_gradient(layer, readout, x, linear)
    mean, se = estimates(layer, readout, x, linear, draws=3000)
    assert torch.all((mean - exact).abs() < 4.5 * se + 1e-6), (mean, exact, se)


def settled_fraction(momentum: float, steps: int = 2500, units: int = 64, batch: int = 16) -> float:
    """A regression with many more gated units than examples per step (as on Hopper, where each
    unit is flipped by about half an example per step), trained with the flip estimator and the
    gate step of Eq. 9 at the given Adam momentum; returns the fraction of surviving theta at 1."""
    torch.manual_seed(0)
    hidden = GatedLinear(4, units, activation=torch.tanh, estimator="flip")
    out = GatedLinear(units, 1, gated=False)
    wiring = [(hidden, [4]), (out, [hidden])]
    weights = [p for n, p in torch.nn.Sequential(hidden, out).named_parameters() if n != "0.theta"]
    opt = torch.optim.Adam(weights, lr=1e-2)
    gate_opt = torch.optim.Adam([hidden.theta], lr=3e-3, betas=(momentum, 0.999))
    P = xinet.ExpectedParams(wiring)  # built once; theta's changes reach it at every call
    dense = P().item()
    X = torch.randn(4096, 4)
    Y = torch.tanh(X[:, :1]) + 0.5 * torch.tanh(X[:, 1:2] - X[:, 2:3])
    for _ in range(steps):
        i = torch.randint(len(X), (batch,))
        hidden.train()
        per_example = lambda: (out(hidden(X[i])) - Y[i]).pow(2)  # (B, 1)
        losses = per_example()
        opt.zero_grad()
        losses.mean().backward(inputs=weights + [hidden.theta])
        grad = xinet.flip_estimate([[hidden]], losses, per_example)[hidden] / losses.mean().detach()
        cost = torch.autograd.grad(P() / dense, hidden.theta)[0]
        hidden.theta.grad = grad + 0.05 * cost
        before = [hidden.theta.detach().clone()]
        opt.step()
        gate_opt.step()
        xinet.project_gates_([hidden], before)
    theta = hidden.theta.detach()
    return float((theta == 1).sum() / (theta > 0).sum())


def test_gate_momentum_lets_theta_settle_at_one():
    """With ~0.25 flips per unit and step, Adam's usual beta1 = 0.9 averages too few estimates:
    the sign of the step is noise and theta keeps leaving 1. Averaging ~1,000 (0.999, the default)
    lets the gates of useful units sit exactly at 1."""
    cfg = Config()  # a gate step every gate_every environment steps: 0.999 per environment step
    assert small_agent().opts["gates"].param_groups[0]["betas"][0] == cfg.gate_momentum ** cfg.gate_every
    assert cfg.gate_momentum == 0.999
    low, high = settled_fraction(0.9), settled_fraction(0.999)
    assert low < 0.6 and high > 0.8, (low, high)


def test_pathwise_bias_on_squared_error_is_measured_and_bounded():
    """For y = sum_j xi_j c_j + b and l = (y - t)^2 the pathwise gradient's bias is exactly
    (2 theta_j - 1) * mean_i c_ij^2: zero at theta = 1/2, largest at the ends."""
    torch.manual_seed(0)
    layer, readout, x, target = tiny_problem("pathwise")
    exact = exact_gradient(layer, readout, x, mse(target))
    mean, se = estimates(layer, readout, x, mse(target), draws=6000)
    c = (torch.tanh(layer.linear(x)) * readout.weight).detach()  # (B, 4)
    bias = (2 * THETA - 1) * c.pow(2).mean(0)
    assert torch.all((mean - exact - bias).abs() < 4.5 * se + 1e-6), (mean - exact, bias, se)
    assert (mean - exact).abs().max() > 10 * se.max()  # the gap is real, not noise
    assert torch.all((mean - exact).abs() <= c.pow(2).mean(0) + 4.5 * se)  # |bias| <= E[c^2]


def test_flip_replay_in_batchnorm_network_changes_only_the_flipped_example():
    """OFENet's BatchNorm couples a batch; the replay pass reuses the main pass's statistics so
    that a flip changes its own example's loss and no other."""
    torch.manual_seed(0)
    net = xinet.OFENet(OBS, ACT, [6, 6], [6, 6], gated=True, estimator="flip").train()
    with torch.no_grad():
        for layer in xinet.gated_layers(net):
            layer.theta.fill_(0.5)
    obs, act, nxt = torch.randn(16, OBS), torch.randn(16, ACT), torch.randn(16, OBS)
    errors = lambda: (net.predict_next_obs(obs, act) - nxt).pow(2).mean(-1)
    main = errors().detach()
    running = net.state_block[0].bn.running_mean.clone()
    first = net.state_block[0]
    first.flip = torch.zeros(16, first.out_features, dtype=torch.bool)
    first.flip[5, 2] = True  # one gate of example 5
    for layer in xinet.gated_layers(net)[1:]:
        layer.flip = torch.zeros(16, layer.out_features, dtype=torch.bool)
    with torch.no_grad():
        replay = errors()
    for layer in xinet.gated_layers(net):
        layer.flip = None
    changed = (~torch.isclose(replay, main, rtol=1e-5, atol=1e-7)).nonzero().flatten().tolist()
    assert changed == [5]  # the rest agree up to rounding (batch vs given statistics kernels)
    assert torch.equal(net.state_block[0].bn.running_mean, running)  # the replay leaves BN alone


# ---------------------------------------------------------------------------------------------
# P(theta) and pruning
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(), dict(ofenet=False), dict(gate="actor,critic"), dict(ofe_units=40, ofe_layers=6, hidden=256)])
def test_expected_params_at_one_is_dense_count(kw):
    agent = small_agent(**kw)
    assert agent.expected_params().item() == agent.sizes()["params"] == agent.dense_params
    assert agent.sizes()["params"] == sum(agent.sizes()[f"params_{k}"] for k in agent.nets)


def test_hopper_dense_parameter_count():
    cfg = xinet.validate(Config())
    agent = Agent(cfg, OBS, -np.ones(ACT), np.ones(ACT))
    state = sum((11 + 40 * k) * 40 + 3 * 40 for k in range(6))
    sa = sum((254 + 40 * k) * 40 + 3 * 40 for k in range(6))
    head = 494 * 11 + 11
    actor = 251 * 256 + 256 + 256 * 256 + 256 + 256 * 6 + 6
    critic = 2 * (494 * 256 + 256 + 256 * 256 + 256 + 257)
    assert agent.sizes()["params"] == state + sa + head + actor + critic


@pytest.mark.parametrize("seed, kw", [(0, {}), (1, {}), (2, dict(ofenet=False)), (3, dict(gate="ofenet,critic"))])
def test_expected_params_equals_count_after_pruning(seed, kw):
    agent = small_agent(seed, **kw)
    set_binary_gates(agent, 0.5, seed)
    expected = agent.expected_params().item()
    assert agent.prune() > 0
    assert expected == agent.sizes()["params"]
    assert agent.expected_params().item() == agent.sizes()["params"]  # still exact, all theta = 1


def test_marginal_cost_prices_early_state_units_highest():
    agent = small_agent(ofe_units=40, ofe_layers=6, hidden=256)
    cost = torch.autograd.grad(agent.expected_params(), [layer.theta for layer in agent.gated])
    by_layer = dict(zip([n for n, m in agent.hidden_layers().items() if m.theta is not None], cost))
    first_state, last_sa = by_layer["ofenet.state_block.0"], by_layer["ofenet.sa_block.5"]
    # a first-layer state unit: fan-in 11 + bias + BN, read by 5 state, 6 state-action layers,
    # the head, the actor's and both critics' first layers
    assert first_state[0].item() == 11 + 3 + 5 * 40 + 6 * 40 + 11 + 3 * 256
    assert last_sa[0].item() == 454 + 3 + 11 + 2 * 256
    assert first_state[0] > last_sa[0]


def trained_agent(seed=0, steps=30):
    agent = small_agent(seed)
    buf = random_buffer(seed=seed)
    for _ in range(steps):
        xinet.update(agent, buf.sample(32), gates_on=True, strength=1.0)
    return agent, buf


def outputs(agent, obs, act):
    agent.eval()
    with torch.no_grad():
        z_o = agent.state_features(obs)
        z_oa = agent.state_action_features(z_o, act)
        return dict(action=torch.as_tensor(agent.act(obs.numpy())), q=agent.q_values(obs, act),
                    q_target=agent.critic_target(z_oa), z_o=z_o.sum(-1), z_oa=z_oa.sum(-1),
                    next_obs=agent.ofenet.predict_next_obs(obs, act))


def test_pruning_is_exact_and_keeps_optimizer_state():
    agent, buf = trained_agent()
    set_binary_gates(agent, 0.6, seed=5)
    obs, act = torch.randn(64, OBS), torch.rand(64, ACT) * 2 - 1
    before = outputs(agent, obs, act)
    layer = agent.critic.qs[0][1]  # second hidden layer of Q1: rows and columns both shrink
    rows, cols = layer.theta > 0, agent.critic.qs[0][0].theta > 0
    moment = agent.opts["critic"].state[layer.linear.weight]["exp_avg"][rows][:, cols].clone()
    params_before = agent.sizes()["params"]
    removed = agent.prune()
    assert removed > 0 and agent.sizes()["params"] < params_before
    after = outputs(agent, obs, act)
    for k in before:
        torch.testing.assert_close(after[k], before[k], atol=1e-5, rtol=1e-5, msg=k)
    assert layer.linear.weight.shape == (int(rows.sum()), int(cols.sum()))
    torch.testing.assert_close(agent.opts["critic"].state[layer.linear.weight]["exp_avg"], moment)
    assert agent.prune() == 0  # nothing left at exactly 0
    for _ in range(5):  # training continues on the smaller tensors
        info = xinet.update(agent, buf.sample(32), gates_on=True, strength=1.0)
    assert all(torch.isfinite(v) for v in info.values())


def test_mlp_layer_keeps_one_unit():
    agent = small_agent()
    with torch.no_grad():
        agent.actor.net[0].theta.zero_()
    agent.prune()
    assert agent.actor.net[0].out_features == 1


def test_save_and_load_pruned_agent(tmp_path):
    agent, _ = trained_agent()
    set_binary_gates(agent, 0.5, seed=7)
    agent.prune()
    path = str(tmp_path / "agent.pt")
    xinet.save_agent(agent, path)
    loaded = xinet.load_agent(path)
    obs, act = torch.randn(16, OBS), torch.rand(16, ACT) * 2 - 1
    a, b = outputs(agent, obs, act), outputs(loaded, obs, act)
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)
    assert loaded.sizes()["params"] == agent.sizes()["params"]
    assert loaded.dense_params == agent.dense_params > agent.sizes()["params"]  # P(1) of the original


# ---------------------------------------------------------------------------------------------
# SAC
# ---------------------------------------------------------------------------------------------

def test_squashed_gaussian_log_prob_matches_change_of_variables():
    torch.manual_seed(0)
    low, high = np.array([-2.0, 0.0]), np.array([1.0, 4.0])
    actor = xinet.Actor(5, [8], low, high, gated=False, estimator="flip").eval()
    z, eps = torch.randn(7, 5), torch.randn(7, 2)
    action, log_prob = actor(z, eps)
    mu, log_std = actor.net(z).chunk(2, -1)
    log_std = xinet.LOG_STD_MIN + 0.5 * (xinet.LOG_STD_MAX - xinet.LOG_STD_MIN) * (torch.tanh(log_std) + 1)
    u = (mu + log_std.exp() * eps).double()
    squash = lambda v: torch.tanh(v) * actor.scale.double() + actor.bias.double()
    h = 1e-6
    jacobian = (squash(u + h) - squash(u - h)) / (2 * h)  # da/du, numerically
    density = torch.distributions.Normal(mu.double(), log_std.exp().double()).log_prob(u)
    numeric = (density - jacobian.abs().log()).sum(-1)
    torch.testing.assert_close(log_prob.double(), numeric, atol=1e-4, rtol=1e-4)
    assert torch.all((action >= torch.tensor(low)) & (action <= torch.tensor(high)))


def test_squashed_density_integrates_to_one():
    actor = xinet.Actor(1, [4], np.array([-3.0]), np.array([1.0]), gated=False, estimator="flip")
    eps = torch.linspace(-9, 9, 200_001)[:, None]
    a, log_prob = actor(torch.ones(len(eps), 1), eps)
    density = log_prob.exp()
    mass = torch.trapezoid(density, a[:, 0].double()).item()
    assert abs(mass - 1) < 1e-3


def test_td_target_bootstraps_on_truncation_not_termination():
    r, v = torch.tensor([1.0, 1.0]), torch.tensor([10.0, 10.0])
    y = xinet.td_target(r, torch.tensor([0.0, 1.0]), v, 0.9)
    assert y.tolist() == [10.0, 1.0]


@pytest.mark.parametrize("estimator", ["flip", "pathwise"])
def test_actor_loss_scale_ignores_the_level_of_q(estimator):
    """Adding 1000 to every Q-value leaves the actor's s_N as it is: the actor's loss is centred
    per state, so s_N measures soft advantages, not the level of Q (which grows with the return)."""
    scales = []
    for shift in (0.0, 1000.0):
        torch.manual_seed(0)
        agent = small_agent(estimator=estimator)
        with torch.no_grad():
            for critic in (agent.critic, agent.critic_target):
                for q in critic.qs:
                    q[-1].linear.bias += shift
        agent.opts["critic"].param_groups[0]["lr"] = 0.0  # the critics keep their shift
        batch = random_buffer().sample(64)
        assert agent.q_values(batch[0], batch[1]).mean() > shift - 10
        xinet.update(agent, batch, gates_on=True, strength=0.0)
        scales.append(agent.loss_scale["actor"].item())
    assert 0 < scales[0] < 10 and scales[1] == pytest.approx(scales[0], rel=1e-2), scales


def test_temperature_moves_toward_target_entropy():
    agent = small_agent()
    low_entropy = torch.full((32,), 10.0)  # -log pi = -10 < target entropy -3: explore more
    before = agent.log_alpha.item()
    xinet.update_temperature(agent, low_entropy)
    assert agent.log_alpha.item() > before
    high_entropy = torch.full((32,), -10.0)
    before = agent.log_alpha.item()
    xinet.update_temperature(agent, high_entropy)
    assert agent.log_alpha.item() < before


# ---------------------------------------------------------------------------------------------
# Replay buffer
# ---------------------------------------------------------------------------------------------

def test_replay_buffer_across_episode_ends_and_wraparound():
    buf = ReplayBuffer(2, 1, capacity=5, device="cpu")
    for t in range(8):  # episodes end at t = 2 (terminated) and t = 5 (truncated: stored as 0)
        nxt = [100.0 + t, 0.0] if t in (2, 5) else [t + 1.0, 0.0]
        buf.add([float(t), 0.0], [t], reward=t, next_obs=nxt, terminated=(t == 2))
    assert buf.size == 5 and buf.pos == 3
    obs, action, reward, next_obs, term = buf.sample(2000)
    t = obs[:, 0]
    assert set(t.tolist()) == {3.0, 4.0, 5.0, 6.0, 7.0}  # the oldest three were overwritten
    assert torch.equal(action[:, 0], t) and torch.equal(reward, t)
    expected_next = torch.where(t == 5, 100.0 + t, t + 1)
    assert torch.equal(next_obs[:, 0], expected_next)
    assert term.sum() == 0  # the terminated t = 2 is gone; truncation never stored as terminal


# ---------------------------------------------------------------------------------------------
# End to end and the command line
# ---------------------------------------------------------------------------------------------

E2E = ["--env", "Hopper-v4", "--total-steps", "1200", "--learning-starts", "300", "--pretrain-steps", "100",
       "--eval-every", "400", "--eval-episodes", "2", "--log-every", "400", "--ofe-layers", "2",
       "--ofe-units", "8", "--hidden", "32", "--batch-size", "64", "--prune-every", "200",
       "--prune-strength", "3", "--gate-lr", "0.05", "--prune-ramp", "0", "--prune-start", "0", "--device", "cpu",
       "--seed", "3"]


def e2e_dense_params() -> int:
    """The parameters of E2E's agent before any pruning."""
    return Agent(small_config(ofe_layers=2, ofe_units=8, hidden=32), OBS, -np.ones(ACT), np.ones(ACT)).sizes()["params"]


def run_cli(*args, cwd=HERE, script="xinet.py"):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, os.path.join(HERE, script), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600, env=env)


def run_main(*args):
    """`python xinet.py ARGS` in this process (no interpreter start-up): main's exit code and output."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = xinet.main(list(args))  # an exception escaping main fails the test, as a traceback would
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def refused(res, words: str) -> bool:
    """The command failed with one sentence holding `words`, no traceback."""
    return res.returncode != 0 and "Traceback" not in res.stderr and words in res.stderr


def read_progress(run_dir):
    with open(os.path.join(run_dir, "progress.csv")) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def e2e_runs(tmp_path_factory):
    torch.set_num_threads(1)
    dirs = []
    for k in range(2):
        out = str(tmp_path_factory.mktemp(f"run{k}"))
        assert xinet.main(E2E + ["--out", out]) == 0
        dirs.append(out)
    return dirs


def test_end_to_end_trains_prunes_and_writes_outputs(e2e_runs):
    rows = read_progress(e2e_runs[0])
    assert [int(r["step"]) for r in rows] == [400, 800, 1200]
    params = [int(r["params"]) for r in rows]
    assert params[-1] < e2e_dense_params()  # pruning removed units within the run
    for r in rows:
        assert math.isfinite(float(r["eval_return"])) and float(r["steps_per_sec"]) > 0
        assert float(r["expected_params"]) <= int(r["params"])  # theta <= 1; equal once binary
        assert all(float(r[f"loss_scale_{k}"]) > 0 for k in ("ofenet", "critic", "actor"))
        for kind in ("one", "inside"):  # per network, adding up to the whole agent's count
            assert int(r[f"theta_{kind}"]) == sum(int(r[f"theta_{kind}_{k}"]) for k in ("ofenet", "critic", "actor"))
    agent = xinet.load_agent(os.path.join(e2e_runs[0], "agent.pt"))
    assert agent.sizes()["params"] == params[-1]
    assert sum(v for k, v in agent.sizes().items() if k.startswith("alive_")) == sum(int(v) for k, v in rows[-1].items() if k.startswith("alive_"))


def test_pathwise_estimator_prunes_end_to_end(tmp_path):
    args = E2E + ["--estimator", "pathwise", "--out", str(tmp_path)]  # E2E: the default (flip)
    assert xinet.main(args) == 0
    rows = read_progress(str(tmp_path))
    assert int(rows[-1]["params"]) < e2e_dense_params()
    assert all(math.isfinite(float(r["eval_return"])) for r in rows)


def test_eval_reloads_checkpoint_in_fresh_process(e2e_runs):
    res = run_cli("--eval", os.path.join(e2e_runs[0], "agent.pt"), "--eval-episodes", "1", "--env", "Hopper-v5")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("Hopper-v5: return") and "parameters" in res.stdout  # --env: another version


def test_same_seed_same_results(e2e_runs):
    a, b = (read_progress(d) for d in e2e_runs)
    timing = {"steps_per_sec", "time", "max_rss_mb"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in a] == \
           [{k: v for k, v in r.items() if k not in timing} for r in b]
    ta, tb = ([l.theta for l in xinet.load_agent(os.path.join(d, "agent.pt")).gated] for d in e2e_runs)
    assert all(torch.equal(x, y) for x, y in zip(ta, tb))


def test_arch_from_builds_small_dense_agent(e2e_runs, tmp_path):
    ckpt = os.path.join(e2e_runs[0], "agent.pt")
    args = E2E + ["--total-steps", "400"]  # a later flag overrides an earlier one
    assert xinet.main(args + ["--arch-from", ckpt, "--out", str(tmp_path)]) == 0
    small = xinet.load_agent(str(tmp_path / "agent.pt"))
    pruned = xinet.load_agent(ckpt)
    assert small.widths() == pruned.widths() and small.sizes()["params"] == pruned.sizes()["params"]
    assert [layer.theta for layer in small.gated] == []  # no gates


@pytest.mark.parametrize("args, words", [
    (["--env", "NoSuchEnv-v9"], "NoSuchEnv-v9"),
    (["--env", "CartPole-v1"], "Discrete"),
    (["--total-steps", "0"], "--total-steps"),
    (["--batch-size", "-3"], "--batch-size"),
    (["--batch-size", "1"], "--batch-size 2 or more"),
    (["--seed", "-5"], "--seed"),
    (["--seed", str(2**32)], "--seed"),
    (["--gate", "ofenet,brain"], "--gate"),
    (["--no-ofenet", "--gate", "ofenet"], "--gate names none"),
    (["--eval", "xinet.py"], "not a readable"),
    (["--eval", "no/such/agent.pt"], "does not exist"),
    (["--out", "/proc/x/run"], "/proc/x/run"),
    (["--prune-strength", "nan"], "--prune-strength"),
    (["--gate-lr", "inf"], "--gate-lr"),
    (["--resume", "no/such/run"], "no/such/run"),
    (["--learning-starts", "0"], "--pretrain-steps 0"),
])
def test_user_errors_are_one_clear_sentence(args, words):
    res = run_main(*args)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    lines = [l for l in res.stderr.splitlines() if l.startswith("xinet: error:")]
    assert len(lines) == 1 and words in lines[0], res.stderr


def test_new_run_into_a_run_directory_is_refused(e2e_runs):
    files = {f: open(os.path.join(e2e_runs[1], f), "rb").read() for f in ("agent.pt", "config.json", "progress.csv")}
    assert refused(run_cli(*E2E, "--out", e2e_runs[1]), f"--resume {e2e_runs[1]}")
    assert all(open(os.path.join(e2e_runs[1], f), "rb").read() == data for f, data in files.items())  # untouched


def test_mismatched_checkpoint_is_refused(e2e_runs, tmp_path):
    payload = torch.load(os.path.join(e2e_runs[0], "agent.pt"), weights_only=True)
    payload["widths"]["actor"] = [w + 1 for w in payload["widths"]["actor"]]
    bad = str(tmp_path / "bad.pt")
    torch.save(payload, bad)
    assert refused(run_main("--eval", bad), "does not match")
    assert refused(run_main("--eval", os.path.join(e2e_runs[0], "agent.pt"), "--env", "Walker2d-v4"), "does not fit")
    res = run_main("--env", "Pendulum-v1", "--arch-from", os.path.join(e2e_runs[0], "agent.pt"),
                   "--total-steps", "10")
    assert refused(res, "other observation")


# ---------------------------------------------------------------------------------------------
# Deployment
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(), dict(ofenet=False)])
@pytest.mark.parametrize("p_keep", [1.0, 0.5, 0.1])
def test_exported_policy_equals_act_at_every_pruning_level(kw, p_keep):
    agent = small_agent(seed=2, **kw)
    if p_keep < 1:
        set_binary_gates(agent, p_keep, seed=3)
    with torch.no_grad():
        for layer in agent.gated:  # survivors strictly inside (0, 1): real multipliers to fold
            layer.theta.mul_(torch.rand_like(layer.theta) * 0.9 + 0.1)
        for layer in agent.ofenet.state_block if agent.ofenet else []:  # BN statistics away from 0, 1
            layer.bn.running_mean.normal_()
            layer.bn.running_var.uniform_(0.2, 3.0)
            layer.bn.weight.normal_()
            layer.bn.bias.normal_()
        for p in xinet.weights(agent.actor):
            p.mul_(3.0)  # actions spread over (-1, 1), not all near 0 (theta stays inside (0, 1))
    agent.prune()
    policy = deploy.export_policy(agent)
    obs = np.random.default_rng(0).normal(size=(256, OBS)).astype(np.float32)
    expected = agent.act(obs)
    with torch.no_grad():
        got = policy(torch.from_numpy(obs)).numpy()
    assert np.abs(got - expected).max() < 1e-5 and expected.std() > 0.1
    assert {type(m) for m in policy.modules()} <= {deploy.DeployedPolicy, torch.nn.ModuleList, torch.nn.Linear}
    assert policy.flops() == agent.sizes()["flops_per_action"] - 2 * agent.actor.net[-1].linear.in_features * ACT


def test_bench_deploy_table(e2e_runs, capsys):
    import bench
    assert bench.main(["--deploy", os.path.join(e2e_runs[0], "agent.pt")]) == 0
    rows = [l for l in capsys.readouterr().out.splitlines() if l.startswith(("| dense", "| pruned"))]
    (dense_params, dense_flops), (params, flops) = [[int(c.replace(",", "")) for c in r.split("|")[2:4]] for r in rows]
    assert params < dense_params and flops < dense_flops


def test_gates_price_table(e2e_runs, capsys):
    import gates
    gates.main(["price", os.path.join(e2e_runs[0], "resume.pt")])
    rows = [[c.strip() for c in l.split("|")[1:-1]] for l in capsys.readouterr().out.splitlines()
            if l.startswith("| ") and not l.startswith("| network")]
    assert [r[0] for r in rows] == ["actor", "actor, uncentred", "critic", "ofenet"]
    for name, mean_abs, abs_mean, std, *quantiles, variance_ratio, gap_one, gap_inside in rows:
        assert float(mean_abs) >= float(abs_mean) and float(std) > 0
        assert [float(q) for q in quantiles] == sorted(float(q) for q in quantiles), name
        assert 0 < float(variance_ratio) < math.inf, name
        assert math.isfinite(float(gap_one)) or math.isfinite(float(gap_inside)), name  # a gated run
    with pytest.raises(SystemExit, match="gates.py: error: checkpoint no/such.pt does not exist"):
        gates.main(["price", "no/such.pt"])


def test_exported_policy_runs_in_a_process_with_only_torch(e2e_runs, tmp_path):
    ckpt, out = os.path.join(e2e_runs[0], "agent.pt"), str(tmp_path / "policy.pt")
    assert refused(run_cli("no/such/agent.pt", script="deploy.py"), "does not exist")
    res = run_cli(ckpt, "--out", out, script="deploy.py")
    assert res.returncode == 0, res.stderr
    assert "parameters" in res.stdout and "FLOPs" in res.stdout and "per action" in res.stdout
    obs = np.random.default_rng(1).normal(size=(32, OBS)).astype(np.float32)
    torch.save(torch.from_numpy(obs), tmp_path / "obs.pt")
    code = ("import sys, torch; policy = torch.jit.load('policy.pt'); "
            "torch.save(policy(torch.load('obs.pt')), 'actions.pt'); assert 'xinet' not in sys.modules")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    expected = xinet.load_agent(ckpt).act(obs)
    assert np.abs(torch.load(tmp_path / "actions.pt").detach().numpy() - expected).max() < 1e-5


# ---------------------------------------------------------------------------------------------
# Resuming a killed run
# ---------------------------------------------------------------------------------------------

def test_killed_run_resumes_to_its_total_steps(tmp_path):
    """SIGKILL after the first checkpoint; a row written after the last checkpoint (a kill
    between the two writes) is dropped; the resumed run ends with every evaluation once."""
    out = str(tmp_path / "run")
    args = E2E + ["--total-steps", "1600"]  # a later flag overrides an earlier one
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "xinet.py"), *args, "--out", out],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=HERE)
    while not os.path.exists(os.path.join(out, "resume.pt")) and proc.poll() is None:
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    step = torch.load(os.path.join(out, "resume.pt"), weights_only=True)["loop"]["step"]
    assert step < 1600
    with open(os.path.join(out, "progress.csv"), "a") as f:  # as if killed before the checkpoint
        f.write(f"{step + 400}" + ",0" * (len(read_progress(out)[0]) - 1) + "\n")
    res = run_main("--resume", out)
    assert res.returncode == 0, res.stderr
    assert f"resumed at step {step:,}" in res.stdout
    assert [int(r["step"]) for r in read_progress(out)] == list(range(400, 1601, 400))
    res = run_main("--eval", os.path.join(out, "agent.pt"), "--eval-episodes", "1")
    assert res.returncode == 0, res.stderr


def test_video_tensorboard_and_plot_of_a_short_run(tmp_path):
    """--capture-video --tensorboard: a video per evaluation whose last holds the final agent's
    deterministic episode frame by frame, event files with the CSV's values, progress.png."""
    import imageio.v3 as iio
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = str(tmp_path / "run")
    res = run_cli(*E2E, "--total-steps", "800", "--eval-episodes", "1", "--out", out, "--capture-video", "--tensorboard")
    assert res.returncode == 0, res.stderr
    rows = read_progress(out)
    assert sorted(os.listdir(os.path.join(out, "videos"))) == sorted(f"step_{r['step']}.mp4" for r in rows)
    frames = iio.imread(os.path.join(out, "videos", "step_800.mp4"))
    env, agent = xinet.make_env("Hopper-v4"), xinet.load_agent(os.path.join(out, "agent.pt"))
    obs, _ = env.reset(seed=3 + 10_000)
    length, done = 0, False
    while not done:
        obs, _, terminated, truncated, _ = env.step(agent.act(obs))
        length, done = length + 1, terminated or truncated
    assert frames.shape == (length + 1, 480, 480, 3) and frames.std() > 0
    board = EventAccumulator(os.path.join(out, "tb"))
    board.Reload()
    for key in ("eval_return", "params", "theta_one", "alive_actor.net.0"):
        logged = [(e.step, e.value) for e in board.Scalars(key)]
        assert logged == [(int(r["step"]), pytest.approx(float(r[key]), rel=1e-6)) for r in rows], key
    assert {"theta/ofenet", "theta/actor", "theta/critic"} <= set(board.Tags()["histograms"])
    assert open(os.path.join(out, "progress.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert [int(r["step"]) for r in csv.DictReader(open(os.path.join(out, "pruning.csv")))]
    two = str(tmp_path / "two.png")
    res = run_main("--plot", out, out, "--out", two)
    assert res.returncode == 0 and os.path.getsize(two) > 10_000, res.stderr


def test_missing_renderer_is_one_sentence_before_training(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore", MUJOCO_GL="osmesa")  # no OSMesa library here
    res = subprocess.run([sys.executable, os.path.join(HERE, "xinet.py"), *E2E, "--out", str(tmp_path / "r"),
                          "--capture-video"], cwd=HERE, capture_output=True, text=True, timeout=300, env=env)
    last = res.stderr.strip().splitlines()[-1]  # after gymnasium's deprecation warning
    assert res.returncode == 2 and last.startswith("xinet: error: cannot render") and "MUJOCO_GL=egl" in last
    assert "Traceback" not in res.stderr and not os.path.exists(tmp_path / "r")


def test_onnx_export_matches_the_policy(e2e_runs, tmp_path):
    import onnxruntime
    out = str(tmp_path / "policy.onnx")
    res = run_cli(os.path.join(e2e_runs[0], "agent.pt"), "--format", "onnx", "--out", out, script="deploy.py")
    assert res.returncode == 0, res.stderr
    assert "actions equal agent.act's" in res.stdout and "FLOPs per action" in res.stdout
    agent = xinet.load_agent(os.path.join(e2e_runs[0], "agent.pt"))
    obs = np.random.default_rng(0).normal(size=(100, agent.obs_dim)).astype(np.float32)
    session = onnxruntime.InferenceSession(out, providers=["CPUExecutionProvider"])
    assert np.abs(session.run(None, {"obs": obs})[0] - agent.act(obs)).max() <= 1e-5


def test_diverging_run_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    """A TD target made NaN from the 150th update on (after the checkpoint of step 400): the run
    stops with one sentence and exit code 2, progress.csv ends at the last finite row, and
    agent.pt and resume.pt are that checkpoint's, finite and loadable."""
    calls, td_target = [0], xinet.td_target

    def poisoned(*args):
        calls[0] += 1
        return td_target(*args) * (float("nan") if calls[0] >= 150 else 1.0)
    monkeypatch.setattr(xinet, "td_target", poisoned)
    out = str(tmp_path / "run")
    assert xinet.main(E2E + ["--out", out]) == 2
    err = capsys.readouterr().err
    assert "diverged" in err and "critics' TD loss" in err and "--critic-lr" in err and "step 400" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert [int(r["step"]) for r in read_progress(out)] == [400]
    agent = xinet.load_agent(os.path.join(out, "agent.pt"))
    assert all(torch.isfinite(t).all() for t in agent.state_dict().values() if t.is_floating_point())
    assert torch.load(os.path.join(out, "resume.pt"), weights_only=True)["loop"]["step"] == 400


def test_sigterm_saves_the_run_where_it_stands_and_resume_goes_on(tmp_path):
    out = str(tmp_path / "run")
    args = E2E + ["--total-steps", "800", "--log-every", "10"]
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "xinet.py"), *args, "--out", out],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE)
    for line in proc.stdout:  # past the first checkpoint (step 400), mid-way to the next
        if line.startswith("step") and int(line.split()[1].replace(",", "")) >= 500:
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    step = torch.load(os.path.join(out, "resume.pt"), weights_only=True)["loop"]["step"]
    assert 500 <= step < 800 and f"stopped by SIGTERM at step {step:,}" in err
    assert [int(r["step"]) for r in read_progress(out)] == [400]
    res = run_main("--resume", out)
    assert res.returncode == 0, res.stderr
    assert f"resumed at step {step:,}" in res.stdout
    assert [int(r["step"]) for r in read_progress(out)] == [400, 800]


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch, failure):
    """A disk that fills mid-write, or a second Ctrl-C during the save: the old file stays whole."""
    agent, path = small_agent(), str(tmp_path / "agent.pt")
    xinet.save_agent(agent, path)
    before = open(path, "rb").read()

    def failing_save(obj, f):
        f.write(b"half a checkpoint")
        raise failure
    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(xinet.UserError if isinstance(failure, OSError) else KeyboardInterrupt) as e:
        xinet.save_agent(agent, path)
    if isinstance(failure, OSError):
        assert "No space left on device" in str(e.value) and "kept" in str(e.value)
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["agent.pt"]


@pytest.mark.parametrize("estimator", ["flip", "pathwise"])
def test_resumed_update_equals_uninterrupted_update(tmp_path, estimator):
    """The checkpoint loses nothing: after loading it, the next update (minibatch draw, gates,
    policy noise, Adam moments, loss scales, BN statistics) gives bit-identical parameters."""
    torch.manual_seed(0)
    cfg = small_config(estimator=estimator, buffer_size=500)
    agent, buffer, env = Agent(cfg, OBS, -np.ones(ACT), np.ones(ACT)), random_buffer(400), xinet.make_env("Hopper-v4")
    set_binary_gates(agent, 0.7, seed=1)
    agent.prune()
    for _ in range(5):
        xinet.update(agent, buffer.sample(64), gates_on=True, strength=0.5)
    path = str(tmp_path / "resume.pt")
    xinet.save_resume(path, agent, buffer, env, {"step": 5})
    xinet.update(agent, buffer.sample(64), gates_on=True, strength=0.5)
    action = env.action_space.sample()

    again, buffer2, loop = xinet.load_resume(path, env, torch.device("cpu"))
    xinet.update(again, buffer2.sample(64), gates_on=True, strength=0.5)
    assert loop == {"step": 5} and again.widths() == agent.widths()
    assert buffer2.size == buffer.size and torch.equal(buffer2.data[:400], buffer.data[:400])
    assert np.array_equal(env.action_space.sample(), action)
    for (name, a), b in zip(agent.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    assert any(0 < t < 1 for theta in [layer.theta for layer in again.gated] for t in theta)  # theta did move


def test_progress_log_widens_its_header_for_a_resumed_run(tmp_path):
    path = str(tmp_path / "progress.csv")
    log = xinet.ProgressLog(path)
    log.write({"step": 5, "a": 1})
    log.write({"step": 10, "a": 2})
    resumed = xinet.ProgressLog(path, after=5)  # killed after row 10, resumed from step 5
    resumed.write({"step": 10, "a": 3, "b": 4})  # newer code logs one more column
    assert read_progress(str(tmp_path)) == [{"step": "5", "a": "1", "b": ""}, {"step": "10", "a": "3", "b": "4"}]


def test_cut_short_or_foreign_resume_file_is_refused(e2e_runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(e2e_runs[0], run)
    assert refused(run_main("--resume", str(run)), "--total-steps")
    assert refused(run_main("--resume", str(run), "--env", "Walker2d-v4"), "contradicts")
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(dict(config, seed=4)))  # resume.pt of another run
    assert refused(run_main("--resume", str(run), "--total-steps", "1600"), "another run")
    (run / "config.json").write_text(json.dumps(config))
    data = (run / "resume.pt").read_bytes()
    (run / "resume.pt").write_bytes(data[:len(data) // 2])
    assert refused(run_main("--resume", str(run), "--total-steps", "1600"), "cut short")
    assert refused(run_main("--eval", os.path.join(e2e_runs[0], "resume.pt")), "resume state (resume.pt); this needs an agent")


def test_readme_example_prunes_a_plain_mlp():
    """The README's example of lifting GatedLinear and the pruning into another model runs."""
    import re
    with open(os.path.join(HERE, "README.md")) as f:
        block = re.search(r"```python\n(.*?)```", f.read(), re.S).group(1)
    torch.manual_seed(0)
    scope = {}
    exec(compile(block, "README.md", "exec"), scope)
    widths = [g.out_features for g in scope["gates"]]
    assert all(1 <= w < 32 for w in widths)  # pruned, yet every layer kept a unit
    P = scope["P"]  # built before pruning, still P(theta) after it
    assert P().item() == xinet.ExpectedParams(scope["wiring"])().item() < scope["dense"]
    scope["net"].eval()
    assert F.mse_loss(scope["net"](scope["x"]), scope["y"]).item() < 0.01


@pytest.mark.parametrize("estimator", ["flip", "pathwise"])
def test_densenet_layer_may_vanish(estimator):
    agent = small_agent(estimator=estimator)
    with torch.no_grad():
        agent.ofenet.state_block[0].theta.zero_()
    obs, act = torch.randn(8, OBS), torch.rand(8, ACT) * 2 - 1
    before = outputs(agent, obs, act)
    assert agent.prune() == 6
    assert agent.ofenet.state_block[0].out_features == 0
    after = outputs(agent, obs, act)
    for k in before:
        torch.testing.assert_close(after[k], before[k], atol=1e-5, rtol=1e-5, msg=k)
    buf = random_buffer()
    for _ in range(3):
        info = xinet.update(agent, buf.sample(32), gates_on=True, strength=1.0)
    assert all(torch.isfinite(v) for v in info.values())
    assert agent.expected_params().item() <= agent.sizes()["params"]
    with torch.no_grad():  # the whole of OFENet may go: z_o = o, z_oa = [o, a]
        for layer in xinet.gated_layers(agent.ofenet):
            layer.theta.zero_()
    agent.prune()
    assert agent.ofenet.state_dim == OBS and agent.ofenet.state_action_dim == OBS + ACT
    xinet.update(agent, buf.sample(32), gates_on=True, strength=1.0)
    assert agent.actor.net[0].linear.in_features == OBS


# ---------------------------------------------------------------------------------------------
# Speed: what bench.py counts
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,gates_on,fraction", [(dict(ofenet=False, gates=False), False, 1.0),
                                                  (dict(gates=False), False, 1.0),
                                                  (dict(), True, 1.0), (dict(), True, 0.3),
                                                  (dict(estimator="flip"), True, 0.5)])
def test_update_flops_from_shapes_match_torch_flop_counter(kw, gates_on, fraction):
    import bench
    agent = small_agent(**kw)
    if fraction < 1:
        bench.prune_at_random(agent, fraction)
    buf = random_buffer()
    xinet.update(agent, buf.sample(64), gates_on, 1.0)  # loss scales exist, as in a running loop
    assert bench.update_flops(agent, 64, gates_on) == bench.measured_update_flops(agent, buf.sample(64), gates_on)


def test_random_pruning_reaches_the_asked_fraction():
    import bench
    torch.manual_seed(0)
    agent = Agent(xinet.validate(Config()), OBS, -np.ones(ACT), np.ones(ACT))  # Hopper's full size
    bench.prune_at_random(agent, 0.1)
    assert abs(agent.sizes()["params"] / agent.dense_params - 0.1) < 0.01
    assert agent.widths()["critic"] == [[l.out_features for l in list(q)[:-1]] for q in agent.critic_target.qs]


def test_bench_runs_and_prints_its_table(capsys):
    import bench
    assert bench.main(["--steps", "3", "--gate-every", "2", "--only", "SAC,XiNet 10%"]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(table) == 3 and table[1].startswith("| SAC | 210,184 |") and table[2].startswith("| XiNet 10% |")
    assert bench.main(["--against", os.path.join(HERE, "xinet.py"), "--steps", "4", "--rounds", "1", "--only", "XiNet 10%"]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| XiNet 10% |")]
    assert len(row) == 1 and float(row[0].split("|")[4]) > 0  # this file against itself: new/old
    with pytest.raises(SystemExit) as stop:
        bench.main(["--gate-every", "0"])
    assert stop.value.code == 2 and "--gate-every must be at least 1" in capsys.readouterr().err
    for other in ("no_such_xinet.py", "README.md", "deploy.py"):  # missing, not Python, not an xinet.py
        with pytest.raises(SystemExit) as stop:
            bench.main(["--against", os.path.join(HERE, other)])
        assert stop.value.code == 2 and f"{other} is not an xinet.py" in capsys.readouterr().err


def test_prune_takes_target_critics_along_with_online_gates():
    agent = small_agent()
    with torch.no_grad():
        agent.critic.qs[0][0].theta[:5] = 0.0  # set on the online critic only
    agent.prune()
    assert agent.critic_target.qs[0][0].out_features == agent.critic.qs[0][0].out_features == 11
    z = torch.randn(4, agent.ofenet.state_action_dim)
    assert agent.critic_target(z).shape == (4, 2)


# ---------------------------------------------------------------------------------------------
# The tutorial
# ---------------------------------------------------------------------------------------------

def test_tutorial_notebook_runs_in_quick_mode(tmp_path, monkeypatch):
    """Every cell of tutorial.ipynb runs without error (XINET_QUICK=1 shrinks its experiments).
    The kernel runs torch on one thread: with two, on a machine whose other core is busy, every
    small operator waits for a descheduled thread and the short run takes hours instead of a minute."""
    import nbclient
    import nbformat
    nb = nbformat.read(os.path.join(HERE, "tutorial.ipynb"), as_version=4)
    monkeypatch.setenv("XINET_QUICK", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nbclient.NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": HERE}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    figures = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(figures) >= 7


# ---------------------------------------------------------------------------------------------
# The GPU path: the update recorded as a CUDA graph (skipped where there is no GPU)
# ---------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("estimator", ["pathwise", "flip"])
def test_cuda_graph_replays_the_eager_update_across_pruning(estimator):
    agents = []
    for graphs in (False, True):
        torch.manual_seed(0)
        agent = Agent(small_config(estimator=estimator, gate_lr=0.05), OBS, -np.ones(ACT), np.ones(ACT),
                      device="cuda")
        learner = xinet.Learner(agent, random_buffer(device="cuda"), 32, graphs)
        for k in range(40):
            learner(gates_on=True, strength=20.0)
            if k % 10 == 9:
                agent.prune()  # the graph is recorded again at the next call
        torch.cuda.synchronize()
        agents.append(agent)
    eager, graphed = agents
    assert graphed.sizes()["params"] < small_agent().sizes()["params"]  # pruning happened between replays
    assert eager.widths() == graphed.widths()
    for (name, p), q in zip(eager.state_dict().items(), graphed.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


@needs_cuda
def test_cuda_training_run_prunes_and_reloads(tmp_path):
    args = E2E + ["--device", "cuda", "--out", str(tmp_path)]
    assert xinet.main(args) == 0
    rows = read_progress(str(tmp_path))
    agent = xinet.load_agent(os.path.join(str(tmp_path), "agent.pt"), "cuda")
    assert agent.sizes()["params"] == int(rows[-1]["params"]) < e2e_dense_params()
    assert all(math.isfinite(float(r["eval_return"])) for r in rows)
    assert xinet.main(["--resume", str(tmp_path), "--total-steps", "1600"]) == 0  # graphs recorded afresh
    assert xinet.main(["--resume", str(tmp_path), "--total-steps", "2000", "--device", "cpu"]) == 0
    assert [int(r["step"]) for r in read_progress(str(tmp_path))] == [400, 800, 1200, 1600, 2000]


# ---------------------------------------------------------------------------------------------
# sweep.py
# ---------------------------------------------------------------------------------------------

def test_sweep_runs_skips_finished_and_aggregates(tmp_path, monkeypatch, capsys):
    import sweep
    tiny = ("--no-gates --ofe-layers 1 --ofe-units 4 --hidden 16 --learning-starts 200 --pretrain-steps 20 "
            "--eval-every 200 --eval-episodes 1 --batch-size 32 --log-every 200")
    monkeypatch.setitem(sweep.GRIDS, "tiny", sweep.Grid({"a": tiny, "b": tiny + " --no-ofenet", "c": tiny},
                                                        seeds=(1, 2), fewer_seeds={"b": (2,), "c": (1,)},
                                                        arch_from={"c": "a"}, steps=600))
    runs, results = str(tmp_path / "runs"), str(tmp_path / "results")
    assert sweep.command(runs, "tiny", "c", 1) is None  # waits for a/seed1, whose architecture it trains
    assert sweep.main(["run", "tiny", "--runs", runs, "--results", results]) == 0
    assert sweep.command(runs, "tiny", "a", 1) == []  # finished: nothing left to run
    with open(os.path.join(runs, "tiny", "c", "seed1", "config.json")) as f:
        assert json.load(f)["arch_from"] == os.path.join(runs, "tiny", "a", "seed1", "agent.pt")
    with open(os.path.join(results, "tiny_summary.csv")) as f:
        summary = list(csv.DictReader(f))
    assert [(r["config"], r["seed"]) for r in summary] == [("a", "1"), ("a", "2"), ("a", "mean of 2"),
                                                           ("b", "2"), ("b", "mean of 1"),
                                                           ("c", "1"), ("c", "mean of 1")]
    assert not os.path.exists(os.path.join(runs, "tiny", "b", "seed1"))  # b runs on seed 2 only
    for cfg in "ab":
        per_seed = [float(r["eval_return"]) for r in summary if r["config"] == cfg and r["seed"].isdigit()]
        mean = next(r for r in summary if r["config"] == cfg and r["seed"].startswith("mean"))
        assert float(mean["eval_return"]) == pytest.approx(np.mean(per_seed))
        assert float(mean["eval_return_lo"]) <= float(mean["eval_return"]) <= float(mean["eval_return_hi"])
    assert os.path.getsize(os.path.join(results, "tiny.png")) > 10_000
    assert "| a | mean of 2 |" in capsys.readouterr().out  # the printed table
    with open(os.path.join(results, "tiny_paired.csv")) as f:  # c against a, the run it copies
        pairs = list(csv.DictReader(f))
    assert [(r["pruned"], r["from_scratch"], r["seed"]) for r in pairs] == [("a", "c", "1"), ("a", "c", "mean of 1")]
    one = {(r["config"], r["seed"]): float(r["train_return"]) for r in summary}
    assert float(pairs[0]["train_return_diff"]) == pytest.approx(one["a", "1"] - one["c", "1"])
    assert sweep.main(["commands", "tiny", "--runs", runs]) == 0 and capsys.readouterr().out == ""
    fresh = str(tmp_path / "fresh")  # a new machine: the finished runs come back from results/
    assert os.path.exists(os.path.join(results, "agents", "tiny", "a", "seed1.pt"))  # what c's --arch-from read
    assert sweep.main(["restore", "tiny", "--runs", fresh, "--results", results]) == 0
    assert all(sweep.command(fresh, "tiny", c, s) == [] for c, s in (("a", 1), ("a", 2), ("b", 2), ("c", 1)))
    assert os.path.exists(os.path.join(fresh, "tiny", "a", "seed1", "agent.pt"))
    again = str(tmp_path / "again")
    sweep.report(fresh, "tiny", again)
    with open(os.path.join(again, "tiny_summary.csv")) as f:
        assert list(csv.DictReader(f)) == summary
    capsys.readouterr()
    import fcntl
    monkeypatch.setattr(sweep.GRIDS["tiny"], "steps", 800)  # a is unfinished again, but running elsewhere
    with open(os.path.join(runs, "tiny", "a", "seed1", "lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert sweep.run_one(runs, "tiny", "a", 1) == 0
    assert "running in another process, skipped" in capsys.readouterr().out
    assert int(read_progress(os.path.join(runs, "tiny", "a", "seed1"))[-1]["step"]) == 600


def test_sweep_missing_results_folder_is_one_sentence(tmp_path):
    for action in (["restore", "hopper"], ["claims"]):
        assert refused(run_cli(*action, "--results", str(tmp_path / "none"), "--runs", str(tmp_path), script="sweep.py"),
                       "No such file or directory")


def test_sweep_claims_statistics(tmp_path, capsys):
    import sweep
    assert sweep.iqm([100, 2, 3, 4, -50]) == 3.0  # the middle half of five: 2, 3, 4
    assert sweep.prob_improvement([2, 3], [1, 3]) == pytest.approx((1 + 0 + 1 + 0.5) / 4)  # a tie counts half
    value, lo, hi = sweep.stratified(lambda d: float(np.mean([a.mean() for a, in d.values()])),
                                     {"e1": (np.array([1.0, 2.0, 3.0]),), "e2": (np.array([5.0, 5.0]),)}, reps=500)
    assert value == pytest.approx(3.5) and lo <= value <= hi and hi - lo < 2  # e2 never varies
    a = {s: {"train_return": r, "eval_return": 2 * r} for s, r in ((1, 10.0), (2, 30.0), (3, 5.0))}
    b = {s: {"train_return": r, "eval_return": r} for s, r in ((3, 6.0), (2, 10.0), (4, 0.0))}
    diff = sweep.difference(a, b)  # paired on seeds 2 and 3 only, in a's order
    assert diff["seeds"] == [2, 3] and diff["train_return_per_seed"] == {2: 20.0, 3: -1.0}
    assert diff["train_return"] == pytest.approx(9.5) and diff["train_return_ahead"] == 1
    assert diff["train_return_lo"] == pytest.approx(-1.0) and diff["train_return_hi"] == pytest.approx(20.0)
    assert diff["eval_return"] == pytest.approx((50 + 4) / 2) and diff["eval_return_ahead"] == 2
    stats = dict(params=1.0, flops_per_action=1.0)
    sweep.write_csv(str(tmp_path / "hopper_summary.csv"), [
        *[{"config": "dense", "seed": s, "train_return": r, "eval_return": r, **stats} for s, r in ((1, 5.0), (2, 7.0))],
        *[{"config": "flip_g30", "seed": s, "train_return": r, "eval_return": r, **stats} for s, r in ((1, 8.0), (2, 6.0))]])
    sweep.claims(str(tmp_path))  # XiNet - dense, paired by seed: +3 and -1
    xinet = next(r for r in csv.DictReader(open(tmp_path / "claims.csv")) if r["agent"] == "xinet")
    assert float(xinet["train_return_minus_dense"]) == pytest.approx(1.0) and xinet["train_return_minus_dense_ahead"] == "1"
    assert "| Hopper-v4 | xinet | +1 [-1, +3] | 1 of 2 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="share no seed"):  # dense's seeds 1-2 against none of them
        sweep.write_csv(str(tmp_path / "walker2d_summary.csv"), [{"config": "sac", "seed": 3, "train_return": 1.0,
                                                                   "eval_return": 1.0, **stats}])
        sweep.pairs(str(tmp_path), "hopper/dense", "walker2d/sac")
