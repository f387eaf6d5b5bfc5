"""Deploying a trained agent: its pruned policy as plain layers, a file that runs without xinet.

    python deploy.py runs/X/agent.pt                   # runs/X/policy.pt: TorchScript (torch alone)
    python deploy.py runs/X/agent.pt --format onnx     # runs/X/policy.onnx: ONNX (ONNX Runtime)

BatchNorm's running statistics and every surviving theta are folded into the weights (Eq. 10),
so the policy has no gate, no BN and no branch left; the written file is checked against
agent.act on a batch of observations.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import xinet


class DeployedPolicy(nn.Module):
    """The deterministic policy a = scale * tanh(mu) + bias of phi_o and the actor, as plain layers:

        z = o;   z <- [z, silu(W_k z + b_k)] for each layer k of phi_o;   mu = W_out relu(... relu(W_1 z + b_1))

    BatchNorm and the gates are folded into the weights (Eq. 10): no gate, no BN and no
    branching is left in forward, so TorchScript saves it as a program that runs without xinet.
    """

    def __init__(self, features: list[nn.Linear], hidden: list[nn.Linear], out: nn.Linear,
                 scale: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.features, self.hidden, self.out = nn.ModuleList(features), nn.ModuleList(hidden), out
        self.register_buffer("scale", scale.clone())
        self.register_buffer("bias", bias.clone())

    def forward(self, obs: torch.Tensor) -> torch.Tensor:  # (B, d_o) -> (B, d_a)
        z = obs
        for layer in self.features:
            z = torch.cat([z, F.silu(layer(z))], dim=-1)
        for layer in self.hidden:
            z = F.relu(layer(z))
        return torch.tanh(self.out(z)) * self.scale + self.bias

    def flops(self) -> int:
        """Multiply-adds x 2 of one action."""
        return sum(2 * m.in_features * m.out_features for m in self.modules() if isinstance(m, nn.Linear))


@torch.no_grad()
def fold(layer: xinet.GatedLinear, gains: torch.Tensor, rows: Optional[int] = None) -> nn.Linear:
    """The nn.Linear that computes BN(W (gains * x) + b) with BN's running statistics:  (Eq. 10)

        W' = diag(s) W diag(gains),   b' = s * (b - mean) + beta,   s = gamma / sqrt(var + eps).

    A gated unit's mean output is theta_j * act(...), and every layer reads it linearly, so its
    theta_j moves into the reader's column j: `gains` holds, per input column, the theta of the
    unit it reads (1 for observations and ungated units). `rows` keeps the first outputs only.
    """
    w, b = layer.linear.weight * gains, layer.linear.bias
    if layer.bn is not None:
        s = layer.bn.weight / torch.sqrt(layer.bn.running_var + layer.bn.eps)
        w, b = w * s[:, None], s * (b - layer.bn.running_mean) + layer.bn.bias
    plain = nn.Linear(w.shape[1], rows or w.shape[0])
    plain.weight.copy_(w[:plain.out_features])
    plain.bias.copy_(b[:plain.out_features])
    return plain


@torch.no_grad()
def export_policy(agent: xinet.Agent) -> DeployedPolicy:
    """phi_o and the actor's mean action as a DeployedPolicy on the CPU: its actions equal
    agent.act(obs, deterministic=True) for any pruning level, with theta still inside (0, 1) too."""
    wiring = dict(agent.wiring(targets=False))
    ones = lambda n: torch.ones(n, device=agent.log_alpha.device)
    gain = lambda s: ones(s) if isinstance(s, int) else s.theta if s.theta is not None else ones(s.out_features)
    plain = lambda layer, rows=None: fold(layer, torch.cat([gain(s) for s in wiring[layer]]), rows)
    features = [plain(l) for l in agent.ofenet.state_block if l.out_features] if agent.ofenet else []
    *hidden, out = agent.actor.net
    return DeployedPolicy(features, [plain(l) for l in hidden], plain(out, rows=agent.act_dim),
                          agent.actor.scale, agent.actor.bias).cpu().eval().requires_grad_(False)


def export_checkpoint(path: str, out: str = "", fmt: str = "torchscript") -> str:
    """Write the exported policy of a saved agent as TorchScript, loadable with torch alone
    (`torch.jit.load(out)(obs)`, or LibTorch from C++), or as ONNX (`onnxruntime`, any
    language); check it against agent.act on a batch of observations and print its size."""
    agent = xinet.load_agent(path)
    policy = export_policy(agent)
    out = out or os.path.join(os.path.dirname(path), "policy.onnx" if fmt == "onnx" else "policy.pt")
    if fmt == "onnx":
        import onnxruntime
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter's progress lines
            program = torch.onnx.export(policy, (torch.zeros(2, agent.obs_dim),), input_names=["obs"],
                                        output_names=["action"], dynamic_shapes=({0: torch.export.Dim("batch")},))
        xinet.write_atomically(out, lambda f: f.write(program.model_proto.SerializeToString()))
        session = onnxruntime.InferenceSession(out, providers=["CPUExecutionProvider"])
        loaded = lambda x: torch.from_numpy(session.run(None, {"obs": x.numpy()})[0])
    else:
        xinet.write_atomically(out, lambda f: torch.jit.save(torch.jit.script(policy), f))
        loaded = torch.jit.load(out)
    obs = torch.randn(256, agent.obs_dim)
    with torch.inference_mode():
        gap = (loaded(obs) - torch.as_tensor(agent.act(obs.numpy()))).abs().max().item()
    if not gap <= 1e-5:
        raise xinet.UserError(f"the exported policy {out} differs from the agent's by {gap:.1e} in its actions.")
    print(f"{out}: {sum(p.numel() for p in policy.parameters()):,} parameters, {policy.flops():,} FLOPs "
          f"per action; actions equal agent.act's to {gap:.0e}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="deploy.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", metavar="CKPT", help="a saved agent (RUN/agent.pt)")
    parser.add_argument("--format", choices=("torchscript", "onnx"), default="torchscript",
                        help="TorchScript (torch alone, or LibTorch from C++) or ONNX (ONNX Runtime, any language)")
    parser.add_argument("--out", default="", help="the file to write (default: policy.pt or policy.onnx beside CKPT)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads < 0:
        parser.error(f"--threads must not be negative, got {args.threads}.")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        export_checkpoint(args.checkpoint, args.out, args.format)
    except xinet.UserError as e:
        print(f"deploy.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
