"""Gate diagnostics: what each unit is worth, and whether theta settles at 0 or 1.

    python gates.py price runs/hopper/dense/seed1/resume.pt   # each unit's break-even gamma
    python gates.py settle --momentum 0.9 0.99 0.999           # OFENet alone: theta exactly at 1?
    python gates.py settle --plain                              # the same with plain flips

`price` loads a run's resume.pt (agent and replay buffer; a dense agent gets gates at theta = 1)
and removes one unit at a time from every example of a batch of 1,024 transitions: the exact
flip estimate of dE[loss]/dtheta_j (Eq. 6). Divided by s_N and by the unit's cost dP/dtheta_j /
P(1) (Eq. 4), it is the gamma at which the unit's price equals its value: under a larger gamma
the unit starts to leave. It prints the quantiles per network, for the actor with and without
the per-state centring of its loss, the size of each network's loss three ways, and how much
the pathwise control variate lowers the variance of one training step's flip estimate (the
median unit; from the exact differences and their linearisation on those transitions). For a
gated run, the last two columns say how near break-even its units are at the run's gamma: each
unit's value minus its price, in standard errors of its value on that batch, as a median over
the units at theta = 1 and over those still inside (0, 1).

`settle` trains OFENet's gates alone (the actor and critics ungated) on 30,000 random-action
Hopper transitions with the flip estimator (`--plain`: without its control variate), for each
Adam momentum (beta1) of the gate step, and reports how many surviving theta sit exactly at 1.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

import numpy as np
import torch

import xinet


@torch.no_grad()
def unit_prices(path: str, batch: int = 1024, seed: int = 0) -> dict:
    payload = xinet.read_checkpoint(path, xinet.RESUME_FORMAT)
    saved = payload["agent"]
    cfg = dataclasses.replace(xinet.Config(**saved["config"]), gates=True, estimator="flip")
    agent = xinet.Agent(cfg, saved["obs_dim"], saved["act_low"].numpy(), saved["act_high"].numpy(), saved["widths"])
    missing, unexpected = agent.load_state_dict(saved["state"], strict=False)
    assert not unexpected and all(k.endswith("theta") for k in missing)  # a dense agent: theta = 1
    rows = payload["buffer"]["rows"]
    buffer = xinet.ReplayBuffer(agent.obs_dim, agent.act_dim, len(rows), torch.device("cpu"))
    buffer.data[:], buffer.size = rows, len(rows)
    buffer.count.fill_(len(rows))
    loop = payload["loop"]
    agent.eval()
    torch.manual_seed(seed)
    obs, action, reward, next_obs, terminated = buffer.sample(batch)
    alpha = agent.log_alpha.exp()
    z_o, z_next = agent.state_features(torch.cat([obs, next_obs])).chunk(2)
    next_action, next_logp = agent.actor(z_next)
    z_oa, z_next_a = agent.state_action_features(torch.cat([z_o, z_next]), torch.cat([action, next_action])).chunk(2)
    y = xinet.td_target(reward, terminated, agent.critic_target(z_next_a).min(-1).values - alpha * next_logp,
                        agent.cfg.discount)
    soft_value = lambda a, logp: alpha * logp - agent.critic(agent.state_action_features(z_o, a)).min(-1).values
    baseline, eps = soft_value(*agent.actor(z_o)), torch.randn(batch, agent.act_dim)
    losses = {"actor": (agent.actor, lambda: soft_value(*agent.actor(z_o, eps)) - baseline),
              "actor, uncentred": (agent.actor, lambda: soft_value(*agent.actor(z_o, eps))),
              "critic": (agent.critic, lambda: (agent.critic(z_oa) - y[:, None]).pow(2).sum(-1))}
    if agent.ofenet is not None:
        losses["ofenet"] = (agent.ofenet, lambda: (agent.ofenet.predict_next_obs(obs, action) - next_obs).pow(2).mean(-1))
    with torch.enable_grad():
        cost = torch.autograd.grad(agent.expected_params() / agent.dense_params, [layer.theta for layer in agent.gated])
    cost = dict(zip(agent.gated, cost))
    report = {"step": loop["step"], "last_eval": loop["last_eval"]}
    gamma = saved["config"]["prune_strength"] if saved["config"]["gates"] else 0.0
    for name, (net, loss) in losses.items():
        net.train()
        torch.manual_seed(seed + 1)
        layers = xinet.gated_layers(net)
        with torch.enable_grad():
            base = loss()  # (B,) with gates drawn at theta
            base.sum().backward(inputs=[layer.theta for layer in layers])  # gate.grad: d_ij
        prices, D, d, z, at_one, size = [], [], [], [], [], base.abs().mean()
        for layer in layers:
            layer.flip = torch.zeros_like(layer.xi)  # every layer replays its own draw
        for layer in layers:
            for j in range(layer.out_features):
                layer.flip[:, j] = True
                D.append((2.0 * layer.xi[:, j] - 1) * (base - loss()))  # (B,) l(xi_j = 1) - l(xi_j = 0)
                layer.flip[:, j] = False
                d.append(layer.gate.grad[:, j])
                prices.append(float(-D[-1].mean() / size / cost[layer][j]))
                gap = -D[-1].mean() - gamma * cost[layer][j] * size  # value - price, loss units
                z.append(float(gap / (D[-1].std() / len(base) ** 0.5)))  # ... in standard errors
                at_one.append(bool(layer.theta[j] == 1))
        for layer in layers:
            layer.flip = None
        net.eval()
        D, d = torch.stack(D, 1), torch.stack(d, 1)  # (B, U): exact differences, their linearisation
        U, b = D.shape[1], agent.cfg.batch_size
        plain = U / b * D.pow(2).mean(0)  # variance of one step's estimate, per unit
        with_cv = d.var(0) / b + U / b * (D - d).pow(2).mean(0)
        report[name] = {"mean |loss|": float(base.abs().mean()), "|mean loss|": float(base.mean().abs()),
                        "std loss": float(base.std()),
                        **{f"q{int(q * 100)}": float(np.quantile(prices, q)) for q in (0.1, 0.25, 0.5, 0.75, 0.9)},
                        "variance ratio": float((plain / with_cv)[D.abs().sum(0) > 0].median()),
                        **{f"net/SE {k}": float(np.median([v for v, one in zip(z, at_one) if one == (k == "at 1")] or np.nan))
                           for k in ("at 1", "inside")}}
    return report


FLIP_ESTIMATE = xinet.flip_estimate


def plain_flips(groups, losses, replay):
    """flip_estimate without its control variate: as if called before the backward pass."""
    for layer in (layer for group in groups for layer in group):
        layer.gate.grad = None
    return FLIP_ESTIMATE(groups, losses, replay)


def settle(momentum: float, strength: float, updates: int, gate_lr: float = 1e-3, seed: int = 1,
           threads: int = 1, control_variate: bool = True) -> dict:
    xinet.flip_estimate = FLIP_ESTIMATE if control_variate else plain_flips
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    np.random.seed(seed)
    cfg = xinet.validate(xinet.Config(gate="ofenet", estimator="flip", gate_momentum=momentum, gate_lr=gate_lr,
                                      prune_strength=strength, seed=seed, pretrain_steps=3000))
    env = xinet.make_env(cfg.env)
    env.action_space.seed(seed)
    agent = xinet.build_agent(cfg, env, torch.device("cpu"))
    buffer = xinet.ReplayBuffer(agent.obs_dim, agent.act_dim, 30_000, torch.device("cpu"))
    obs, _ = env.reset(seed=seed)
    for _ in range(30_000):
        obs, _, done = xinet.env_step(env, buffer, obs, env.action_space.sample())
        if done:
            obs, _ = env.reset()
    xinet.pretrain_ofenet(agent, buffer, cfg)
    held_out = buffer.sample(4096)
    for u in range(1, updates + 1):
        obs, action, _, next_obs, _ = buffer.sample(cfg.batch_size)
        xinet.update_ofenet(agent, obs, action, next_obs, gates_on=True)
        xinet.gate_step(agent, strength * min(1.0, u / 3000))
        if u % cfg.prune_every == 0:
            agent.prune()
    theta = torch.cat([t.detach() for t in [layer.theta for layer in agent.gated]])
    with torch.no_grad():
        mse = (agent.ofenet.predict_next_obs(held_out[0], held_out[1]) - held_out[3]).pow(2).mean()
    return {"momentum": momentum, "strength": strength, "updates": updates, "alive": int((theta > 0).sum()),
            "at_one": int((theta == 1).sum()), "inside": int(((theta > 0) & (theta < 1)).sum()),
            "aux_mse": float(mse)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="gates.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="action", required=True)
    price = sub.add_parser("price", help="each unit's break-even gamma at a run's resume.pt")
    price.add_argument("resume", nargs="+")
    s = sub.add_parser("settle", help="OFENet's gates alone on random Hopper data, per gate momentum")
    s.add_argument("--momentum", type=float, nargs="+", default=[0.9, 0.99, 0.999])
    s.add_argument("--strength", type=float, default=0.1)
    s.add_argument("--updates", type=int, default=8000)
    s.add_argument("--gate-lr", type=float, default=1e-3)
    s.add_argument("--plain", action="store_true", help="plain flips, without the control variate")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.action == "settle":
        print("| gate momentum | units alive | theta exactly 1 | inside (0, 1) | aux MSE |\n|---|---|---|---|---|")
        for m in a.momentum:
            r = settle(m, a.strength, a.updates, a.gate_lr, control_variate=not a.plain)
            print(f"| {m} | {r['alive']} | {r['at_one']} | {r['inside']} | {r['aux_mse']:.5f} |", flush=True)
        return
    for path in a.resume:
        try:
            r = unit_prices(path)
        except xinet.UserError as e:
            sys.exit(f"gates.py: error: {e}")
        print(f"{path}: step {r.pop('step'):,}, last evaluation {r.pop('last_eval'):.0f}\n"
              "| network | mean abs loss | abs mean loss | std loss | break-even gamma: 10% | 25% | 50% | 75% | 90% "
              "| flip variance, plain / control variate | (value - price) / SE, median: theta at 1 | inside (0, 1) |"
              "\n|---|---|---|---|---|---|---|---|---|---|---|---|")
        for name, q in r.items():
            print(f"| {name} | " + " | ".join(f"{v:.4g}" for v in q.values()) + " |", flush=True)

if __name__ == "__main__":
    main()
