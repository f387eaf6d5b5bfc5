"""How fast does XiNet train, and how close is that to what the machine can do?

    python bench.py                   # this machine's CPU, all the threads torch uses
    python bench.py --device cuda     # one GPU
    python bench.py --deploy runs/X/agent.pt --threads 1   # the deployed policy's time per action
    python bench.py --compile --threads 1                   # XiNet 10%'s update under torch.compile
    git show HEAD~1:xinet.py > /tmp/old.py && python bench.py --against /tmp/old.py --threads 1   # a change's speed

On Hopper-v4 (obs 11, action 3) with batch 256 it times the training loop's step, i.e. one
environment step, one action, one replay insert and one full update, for

    SAC          plain SAC on raw observations (--no-ofenet --no-gates)
    OFE-SAC      the dense agent without gates (--no-gates)
    XiNet 100%   XiNet at the start of gate training: every theta = 1, nothing pruned yet
    XiNet 50%    XiNet pruned at random to 50% of its parameters, gates still training
    XiNet 10%    the same at 10%

timed in turns (`--rounds`, each configuration's steps in six rounds by default, the median
kept), so that a machine whose speed drifts slows every row alike, and prints, for each: the
training steps/s; the matrix-multiply FLOPs of one update, counted
from the layer shapes (forward, backward and the estimator's extra passes, see update_flops);
the achieved GFLOP/s of the update alone; and that as a fraction of this machine's float32
matrix-multiply rate, measured in the same run on a large square product.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
import time
import timeit

import numpy as np
import torch

import deploy
import xinet

BATCH = 256


# ----------------------------------------------------------------------------------------------
# FLOPs of one update, from the layer shapes
# ----------------------------------------------------------------------------------------------

def linear_flops(layers, rows: int, weight_grad: bool = False, input_grad: bool = False,
                 first_input_grad: bool = True) -> int:
    """2 * rows * in * out per product: the forward, and in backward dW = g^T x and dx = g W.
    The first layer's dx is computed only if its input requires grad (`first_input_grad`)."""
    total = 0
    for k, layer in enumerate(layers):
        f = 2 * rows * layer.linear.in_features * layer.out_features
        total += f * (1 + weight_grad + (input_grad and (k > 0 or first_input_grad)))
    return total


def update_flops(agent: xinet.Agent, batch: int, gates_on: bool) -> int:
    """Matrix-multiply FLOPs of one `xinet.update`, pass by pass (element-wise work not counted)."""
    B, ofe = batch, agent.ofenet
    flip = gates_on and agent.cfg.estimator == "flip"  # one more forward of each trained network
    actor = list(agent.actor.net)
    critics = lambda **kw: sum(linear_flops(list(q), B, **kw) for q in agent.critic.qs)
    grads = dict(weight_grad=True, input_grad=True)
    S, SA, head = (list(ofe.state_block), list(ofe.sa_block), [ofe.head]) if ofe else ([], [], [])

    ofenet = linear_flops(S, B, first_input_grad=False, **grads) + linear_flops(SA + head, B, **grads)
    ofenet += flip * linear_flops(S + SA + head, B)
    targets = linear_flops(S, 2 * B) + linear_flops(SA, 2 * B)  # [o; o'] and both (z, a) share passes
    targets += linear_flops(actor, B) + critics()               # pi(o'), the target critics
    critic = critics(first_input_grad=False, **grads) + flip * critics()
    policy = linear_flops(actor, B, first_input_grad=False, **grads)  # pi(o), back to its weights
    policy += linear_flops(SA, B, input_grad=True) + critics(input_grad=True)  # Q(z_oa(a)), back to a
    baseline = gates_on and bool(xinet.gated_layers(agent.actor))  # a gate step's per-state baseline
    policy += (baseline + flip) * (linear_flops(actor, B) + linear_flops(SA, B) + critics())  # and flip replay
    return ofenet + targets + critic + policy


def measured_update_flops(agent: xinet.Agent, batch_tensors, gates_on: bool) -> int:
    """The same count taken by torch's FLOP counter from one real update (a cross-check)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        xinet.update(agent, batch_tensors, gates_on, 1.0)
    return counter.get_total_flops()


def kernels_per_update(agent: xinet.Agent, batch_tensors, gates_on: bool, device: torch.device) -> int:
    """Kernels one eager update launches: on a GPU, counted by the profiler; on a CPU, the
    non-view operators dispatched (each one a kernel call). Time per step ~ kernels x overhead."""
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            xinet.update(agent, batch_tensors, gates_on, 0.0)
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += not func.is_view
            return func(*args, **(kwargs or {}))

    with Count() as count:
        xinet.update(agent, batch_tensors, gates_on, 0.0)
    return count.n


def matmul_floor(agent: xinet.Agent, batch_tensors, gates_on: bool, device: torch.device) -> float:
    """Seconds per update of its matrix products alone, at their own shapes: the products of one
    real update are recorded and replayed on random data. What no overhead-free step can beat."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
                a, b = args[-2:]
                self.shapes.append((a.shape, b.shape))
            return func(*args, **(kwargs or {}))

    with Record() as record:
        xinet.update(agent, batch_tensors, gates_on, 0.0)
    pairs = [(torch.randn(a, device=device), torch.randn(b, device=device)) for a, b in record.shapes]
    reps = 20
    for timed in (False, True):  # a warm-up, then the measurement
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            for a, b in pairs:
                torch.mm(a, b)
        sync(device)
    return (time.perf_counter() - t0) / reps


# ----------------------------------------------------------------------------------------------
# The machine's matmul rate
# ----------------------------------------------------------------------------------------------

def seconds_per_call(fn, calls: int, repeat: int = 5) -> float:
    """Wall time of one call of fn: the best of `repeat` rounds of `calls` calls, the round
    least disturbed by other work on the machine."""
    fn()
    return min(timeit.repeat(fn, number=calls, repeat=repeat)) / calls


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(device: torch.device, seconds: float = 1.0) -> float:
    """float32 GFLOP/s of a large square product (TF32 off: plain float32, as training uses)."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    torch.mm(a, b)
    sync(device)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b)
        reps += 1
        if device.type == "cuda":
            sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


# ----------------------------------------------------------------------------------------------
# One configuration
# ----------------------------------------------------------------------------------------------

def prune_at_random(agent: xinet.Agent, fraction: float, seed: int = 0) -> None:
    """Set theta = 0 on random units until P(theta) is `fraction` of the dense count, then prune.

    Each gated unit survives with probability q, and q is bisected on P(theta) itself (Eq. 4),
    so the compacted agent has `fraction` of the parameters, up to the randomness of the draw.
    """
    layers = agent.gated
    g = torch.Generator().manual_seed(seed)
    draws = [torch.rand(layer.out_features, generator=g) for layer in layers]
    lo, hi = 0.0, 1.0
    for _ in range(40):
        q = (lo + hi) / 2
        with torch.no_grad():
            for layer, u in zip(layers, draws):
                layer.theta.copy_((u < q).float())
        lo, hi = (q, hi) if agent.expected_params().item() < fraction * agent.dense_params else (lo, q)
    agent.prune()


class Bench:
    """One configuration, set up to be timed: its agent (pruned at random to `prune_to` of its
    parameters), an environment and a buffer of random-action data to sample from. `time(n,
    with_env)` runs n training steps (with_env: environment step, action, insert and update; else
    the update alone) with a gate step every gate_every steps, as in training."""

    def __init__(self, name: str, cfg: xinet.Config, device: torch.device, prune_to: float = 1.0, x=xinet):
        self.name, self.cfg, self.device, self.x = name, x.validate(cfg), device, x  # x: the xinet module timed
        torch.manual_seed(cfg.seed)
        self.env = x.make_env(cfg.env)
        self.agent = agent = x.build_agent(cfg, self.env, device)
        if prune_to < 1:
            prune_at_random(agent, prune_to)
        self.buffer = x.ReplayBuffer(agent.obs_dim, agent.act_dim, 100_000, device)
        self.obs, _ = self.env.reset(seed=cfg.seed)
        for _ in range(2_000):  # random-action data to sample from
            self.obs, _, done = x.env_step(self.env, self.buffer, self.obs, self.env.action_space.sample())
            if done:
                self.obs, _ = self.env.reset()
        self.gates_on = cfg.gates and bool(agent.gated)
        graphs = device.type == "cuda" and cfg.cuda_graphs
        self.learner, self.explore = x.Learner(agent, self.buffer, BATCH, graphs), x.Explorer(agent, graphs)
        self.step, self.times = 0, {True: [], False: []}

    def time(self, n: int, with_env: bool) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        for _ in range(n):
            if with_env:
                self.obs, _, done = self.x.env_step(self.env, self.buffer, self.obs, self.explore(self.obs))
                if done:
                    self.obs, _ = self.env.reset()
            self.step = (self.step + 1) % self.cfg.gate_every  # a gate step every gate_every steps
            self.learner(self.gates_on and self.step == 0, 0.0)  # gamma 0: nothing pushed to 0 while timing
        sync(self.device)
        return (time.perf_counter() - t0) / n

    def row(self) -> dict:
        """The median over the timed rounds, and the counts of one update (the mean over a gate cycle)."""
        agent, k = self.agent, self.cfg.gate_every if self.gates_on else 1

        def cycle(f):
            on = f(self.gates_on)
            agent.mark_sure_gates()
            return (on + (k - 1) * f(False)) / k
        flops = cycle(lambda g: update_flops(agent, BATCH, g))
        kernels = cycle(lambda g: kernels_per_update(agent, self.buffer.sample(BATCH), g, self.device))
        # on a GPU the products replayed one launch at a time would time the launches, not the products
        floor = (cycle(lambda g: matmul_floor(agent, self.buffer.sample(BATCH), g, self.device))
                 if self.device.type == "cpu" else float("nan"))
        step_time, update_time = (float(np.median(self.times[e])) for e in (True, False))
        self.env.close()
        return {"config": self.name, "params": agent.sizes()["params"], "steps_per_s": 1 / step_time,
                "update_ms": 1e3 * update_time, "mflop": flops / 1e6, "gflops": flops / update_time / 1e9,
                "kernels": kernels, "matmul_ms": 1e3 * floor}


def time_in_turns(benches: list[Bench], steps: int, rounds: int) -> None:
    """Times every configuration in turns: `rounds` rounds, each of steps/rounds training steps and
    as many updates alone per configuration, so that a machine that drifts (shared, throttled)
    slows every configuration alike; a row is then the median of its rounds."""
    n = max(steps // rounds, 4)
    for b in benches:
        b.time(max(20, n // 2), True)  # warm-up
    for r in range(rounds):
        for b in benches:
            for with_env in (True, False):
                b.times[with_env].append(b.time(n, with_env))
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{b.name} {1 / b.times[True][-1]:.1f}" for b in benches)
              + " steps/s", flush=True)


def load_other_xinet(path: str):
    """Another version of xinet.py as the module `xinet_old`; one sentence if it is not one."""
    try:
        spec = importlib.util.spec_from_file_location("xinet_old", path)
        if spec is None:
            raise ImportError("not a .py file")
        old = sys.modules["xinet_old"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
        spec.loader.exec_module(old)
        for name in ("Config", "validate", "build_agent", "make_env", "ReplayBuffer", "Learner", "Explorer", "env_step"):
            getattr(old, name)  # what Bench uses
    except Exception as e:  # no such file, not Python, not an xinet.py
        print(f"bench.py: error: {path} is not an xinet.py to time against ({type(e).__name__}: {e}).", file=sys.stderr)
        sys.exit(2)
    return old


def against_table(old, configs: list, steps: int, rounds: int) -> None:
    """A change's speed: each configuration's update with this xinet.py and with another version
    of it (the module `old`), timed in turns in one process; new/old below 1 is faster."""
    benches = [Bench(f"{name} {v}", x.Config(env="Hopper-v4", **kw), torch.device("cpu"), fraction, x)
               for name, kw, fraction in configs for v, x in (("old", old), ("new", xinet))]
    time_in_turns(benches, steps, rounds)
    ms = [1e3 * float(np.median(b.times[False])) for b in benches]
    print(f"\nCPU, {torch.get_num_threads()} thread(s)\n\n| config | old update ms | new update ms | new/old |\n|---|---|---|---|")
    for (name, *_), t_old, t_new in zip(configs, ms[::2], ms[1::2]):
        print(f"| {name} | {t_old:.2f} | {t_new:.2f} | {t_new / t_old:.3f} |")


def deploy_table(ckpt: str) -> None:
    """Time per action of the deployed policy (CPU): the dense policy and the checkpoint's pruned
    one, each through agent.act and exported (export_policy, as TorchScript, as deploy.py writes
    it), at batch 1 (numpy in, numpy out, as a control loop calls it) and at batch 1,000."""
    pruned = xinet.load_agent(ckpt)
    low, high = (pruned.actor.bias - pruned.actor.scale).numpy(), (pruned.actor.bias + pruned.actor.scale).numpy()
    dense = xinet.Agent(dataclasses.replace(pruned.cfg, gates=False, arch_from=""), pruned.obs_dim, low, high)
    rng = np.random.default_rng(0)
    one, many = rng.normal(size=pruned.obs_dim).astype(np.float32), rng.normal(size=(1000, pruned.obs_dim)).astype(np.float32)
    print(f"CPU, {torch.get_num_threads()} thread(s); {ckpt}")
    print("\n| policy | parameters | FLOPs/action | agent.act, µs/action (batch 1) | exported, µs/action (batch 1) "
          "| agent.act, ms/1,000 actions (batch 1,000) | exported, ms/1,000 actions (batch 1,000) |")
    print("|---|---|---|---|---|---|---|")
    times = {}
    for name, agent in (("dense", dense), ("pruned", pruned)):
        policy = torch.jit.script(deploy.export_policy(agent))
        with torch.inference_mode():
            exported = lambda x: policy(torch.from_numpy(x)).numpy()
            t = [seconds_per_call(lambda: agent.act(one), 2000) * 1e6,
                 seconds_per_call(lambda: exported(one[None])[0], 2000) * 1e6,
                 seconds_per_call(lambda: agent.act(many), 50) * 1e3,
                 seconds_per_call(lambda: exported(many), 50) * 1e3]
        times[name] = t
        plain = deploy.export_policy(agent)
        print(f"| {name} | {sum(p.numel() for p in plain.parameters()):,} | {plain.flops():,} | "
              + " | ".join(f"{x:.0f}" if k < 2 else f"{x:.2f}" for k, x in enumerate(t)) + " |")
    print(f"\nexported pruned policy vs dense agent.act at batch 1: {times['dense'][0] / times['pruned'][1]:.1f}x faster")


def twin_critics_table(reps: int = 5) -> None:
    """Both critics' forward and backward (batch 256) as two MLPs, as xinet.py runs them, against
    one `baddbmm` per layer over stacked weights, the narrower critic's extra units masked to 0:
    the lever of batching the twin critics, measured before building it into GatedLinear."""
    cases = [("SAC", 14, (256, 256), (256, 256)), ("XiNet 100%", 494, (256, 256), (256, 256)),
             ("XiNet 10%", 120, (40, 30), (25, 50))]
    print(f"CPU, {torch.get_num_threads()} thread(s); batch {BATCH}\n\n| critics' input, widths | two MLPs, ms "
          "| one batched MLP, ms | speed-up |\n|---|---|---|---|")
    for name, d_in, *widths in cases:
        z = torch.randn(BATCH, d_in, requires_grad=True)
        mlps = [[torch.nn.Linear(i, o) for i, o in zip((d_in, *w), (*w, 1))] for w in widths]
        wide = [max(w[k] for w in widths) for k in range(2)]
        stacked = [(torch.randn(2, i, o, requires_grad=True), torch.zeros(2, 1, o, requires_grad=True))
                   for i, o in zip((d_in, *wide), (*wide, 1))]
        masks = [torch.stack([torch.arange(wide[k]) < w[k] for w in widths]).unsqueeze(1).float() for k in range(2)]

        def two():
            outs = []
            for layers in mlps:
                h = z
                for k, layer in enumerate(layers):
                    h = layer(h) if k == len(layers) - 1 else torch.relu(layer(h))
                outs.append(h)
            torch.cat(outs, -1).sum().backward()

        def batched():
            h = z.expand(2, *z.shape)
            for k, (w, b) in enumerate(stacked):
                h = torch.baddbmm(b, h, w)
                h = torch.relu(h) * masks[k] if k < 2 else h
            h.sum().backward()
        t = [min(seconds_per_call(f, 50) for _ in range(reps)) * 1e3 for f in (two, batched)]
        print(f"| {name}: {d_in}, {widths[0]} and {widths[1]} | {t[0]:.2f} | {t[1]:.2f} | {t[0] / t[1]:.2f}x |")


def compile_table(rounds: int = 4, cycles: int = 10) -> None:
    """The lever of torch.compile: XiNet 10%'s update eager against `torch.compile(update,
    dynamic=True)`, timed in turns, in three stages of one process: the updates between gate
    steps; the same after a pruning event (at random, to 5%), whose new shapes recompile; and
    a gate step every gate_every updates, as in training. Prints each stage's first compiled
    cycle (its compilation), the medians, and the graphs compiled so far."""
    import torch._dynamo.utils
    b = Bench("XiNet 10%", xinet.Config(env="Hopper-v4"), torch.device("cpu"), 0.1)
    compiled, k = torch.compile(xinet.update, dynamic=True), b.cfg.gate_every

    def cycle(update, gates: bool) -> float:  # seconds per update over k updates
        t0 = time.perf_counter()
        for i in range(k):
            update(b.agent, b.buffer.sample(BATCH), gates and i == 0, 0.0)
        b.agent.mark_sure_gates()
        return (time.perf_counter() - t0) / k
    print(f"CPU, {torch.get_num_threads()} thread(s); batch {BATCH}\n\n| stage | params | first compiled cycle, s "
          "| eager, ms/update | compiled, ms/update | speed-up | graphs compiled |\n|---|---|---|---|---|---|---|")
    for stage, fraction, gates in (("10%, between gate steps", 1.0, False), ("pruned to 5%, between gate steps", 0.05, False),
                                   (f"5%, a gate step in {k} (as in training)", 1.0, True)):
        if fraction < 1:
            prune_at_random(b.agent, fraction)
        first = cycle(compiled, gates) * k
        times = {xinet.update: [], compiled: []}
        for _ in range(rounds):
            for update in times:
                times[update].append(sum(cycle(update, gates) for _ in range(cycles)) / cycles)
        eager, fast = (1e3 * float(np.median(t)) for t in times.values())
        print(f"| {stage} | {b.agent.sizes()['params']:,} | {first:.0f} | {eager:.2f} | {fast:.2f} | {eager / fast:.2f}x "
              f"| {torch._dynamo.utils.counters['stats']['unique_graphs']} |", flush=True)


CONFIGS = [
    ("SAC", dict(ofenet=False, gates=False), 1.0),
    ("OFE-SAC", dict(gates=False), 1.0),
    ("XiNet 100%", dict(), 1.0),
    ("XiNet 50%", dict(), 0.5),
    ("XiNet 10%", dict(), 0.1),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--steps", type=int, default=0, help="timed steps per configuration (0: 300 on a CPU, 2000 on a GPU)")
    parser.add_argument("--rounds", type=int, default=6, help="turns in which the configurations are timed")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--estimator", default=xinet.Config.estimator, choices=xinet.CHOICES["estimator"])
    parser.add_argument("--gate-every", type=int, default=xinet.Config.gate_every, help="updates between gate steps")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="run the GPU update eagerly")
    parser.add_argument("--only", default="", help="comma-separated subset of the configurations")
    parser.add_argument("--deploy", metavar="CKPT", default="", help="time the deployed policy of a saved agent instead")
    parser.add_argument("--twin-critics", action="store_true", help="time the twin critics as two MLPs and as one batched MLP instead")
    parser.add_argument("--compile", action="store_true", help="time XiNet 10%%'s update eager and under torch.compile instead")
    parser.add_argument("--against", metavar="OLD_XINET_PY", default="", help="time each update against this other xinet.py's instead")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.gate_every < 1:
        parser.error(f"--rounds and --gate-every must be at least 1, got {args.rounds} and {args.gate_every}.")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench.py: error: --device cuda was asked for but no CUDA device is available.", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.twin_critics or args.compile:
        (twin_critics_table if args.twin_critics else compile_table)()
        return 0
    only = set(filter(None, args.only.split(",")))
    configs = [c for c in CONFIGS if not only or c[0] in only]
    if args.against:
        against_table(load_other_xinet(args.against), configs, args.steps or 300, args.rounds)
        return 0
    if args.deploy:
        try:
            deploy_table(args.deploy)
        except xinet.UserError as e:
            print(f"bench.py: error: {e}", file=sys.stderr)
            return 2
        return 0
    device = torch.device(args.device)
    steps = args.steps or (2000 if device.type == "cuda" else 300)
    rate = matmul_rate(device)
    threads = torch.get_num_threads()
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {threads} thread{'s' * (threads > 1)}"
    print(f"{where}: float32 matmul {rate:.0f} GFLOP/s; Hopper-v4, batch {BATCH}, {steps} timed steps and as many updates each, in {args.rounds} turns")
    benches = [Bench(name, xinet.Config(env="Hopper-v4", device=args.device, estimator=args.estimator,
                                        gate_every=args.gate_every, cuda_graphs=not args.no_cuda_graphs, **kw), device, fraction)
               for name, kw, fraction in configs]
    time_in_turns(benches, steps, args.rounds)
    rows = [b.row() for b in benches]
    dense = next((r for r in rows if r["config"] == "XiNet 100%"), None)
    print(f"\n| config | params | train steps/s | vs XiNet 100% | update ms | its matmuls alone, ms | "
          f"MFLOP/update | GFLOP/s | of matmul rate | kernels/update |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        speedup = f"{r['steps_per_s'] / dense['steps_per_s']:.2f}x" if dense else "-"
        alone = f"{r['matmul_ms']:.2f}" if r["matmul_ms"] == r["matmul_ms"] else "-"  # nan on a GPU
        print(f"| {r['config']} | {r['params']:,} | {r['steps_per_s']:.1f} | {speedup} | {r['update_ms']:.2f} | "
              f"{alone} | {r['mflop']:.0f} | {r['gflops']:.1f} | {r['gflops'] / rate:.0%} | {r['kernels']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
