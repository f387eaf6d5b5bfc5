"""Grids of xinet runs (configurations x seeds): run them, resume them, aggregate them.

    python sweep.py run sac_parity --jobs 2     # every run not yet finished, two at a time
    python sweep.py commands sac_parity         # one command per run: GNU parallel, Slurm arrays
    python sweep.py report sac_parity           # results/sac_parity.csv, _summary.csv, .png
    python sweep.py restore sac_parity          # a fresh machine: finished runs back from results/
    python sweep.py claims                      # results/claims.csv: every environment x agent
    python sweep.py pairs walker2d/xinet_g10 walker2d/dense   # one minus the other, paired by seed

A run lives in runs/<grid>/<config>/seed<S>. `one` (what `run` and the printed commands call)
skips a finished run, resumes an interrupted one from its resume.pt and starts a missing one; it
leaves alone a run that another process is running (a lock on the run directory), so any of
these commands may be killed and started again, or run twice at once. `report` also keeps the
agent.pt of every finished run that another configuration trains from scratch (--arch-from) in
results/agents/<grid>/<config>/seed<S>.pt; `restore` writes each finished run's progress.csv
(from results/<grid>.csv) and those agents back, so a new checkout redoes no finished run.

The statistics of record (README, "Results"), per run and then as the mean over seeds with a
95% bootstrap interval: the training return over the last 10% of the steps (90k-100k of a 100k
run: the mean of the progress rows in that window) and the final evaluation (10 episodes).
"""
from __future__ import annotations

import argparse
import csv
import fcntl
import os
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class Grid:
    configs: dict[str, str]
    """configuration name -> xinet.py flags"""
    seeds: tuple[int, ...] = (1, 2, 3)
    fewer_seeds: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """configurations run on a subset of the seeds (e.g. a frontier of prices) -> their seeds"""
    arch_from: dict[str, str] = field(default_factory=dict)
    """configurations that train another's final architecture from scratch -> that configuration
    (`--arch-from` its run of the same seed; they start once that run has finished)"""
    env: str = "Hopper-v4"
    steps: int = 100_000
    common: str = field(default="")
    """flags shared by every configuration"""

    def seeds_of(self, config: str) -> tuple[int, ...]:
        return self.fewer_seeds.get(config, self.seeds)


SAC = "--no-ofenet --no-gates"
# Gating from the end of pre-training (step 10k, --prune-start 0) was the default when these ran.
FRONTIER = {f"flip_g{g}": f"--estimator flip --prune-strength {g} --prune-start 0" for g in (1, 3, 10, 30, 50, 100)}
SAC_FAST = f"{SAC} --learning-starts 5000 --critic-lr 0.001"  # CleanRL's: 5k random steps, critic and temperature 1e-3
LATE = "--prune-start 30000 --prune-strength 30"  # gating from 30k at γ = 30: the default when these ran
BEYOND = {"sac": SAC, "dense": "--no-gates", "xinet_late": LATE, "small_late": "--no-gates"}
LR1E3 = "--lr 0.001 --critic-lr 0.001"  # actor, OFENet, critics and temperature at 1e-3
G10 = {"xinet_g10": "--prune-start 30000 --prune-strength 10", "small_g10": "--no-gates"}  # the default since these ran
GRIDS = {
    # Plain SAC's settings against the widely used single-file SAC's (5k random steps, critic
    # and temperature learning rate 1e-3); both on seeds 1-5, plain SAC also on 6-7 (Hopper's
    # dense agent and default have seven).
    "sac_parity": Grid({"sac": SAC, "sac_fast": SAC_FAST}, seeds=(1, 2, 3, 4, 5, 6, 7),
                       fewer_seeds={"sac_fast": (1, 2, 3, 4, 5)}),
    # The runs of record: the dense OFENet agent on seven seeds (4-5 beside the default's seeds 4-5
    # in hopper_recheck, 6-7 after its 6-7: XiNet - dense pairs on all seven), XiNet with the flip
    # estimator at six prices γ (the frontier of return against size), three seeds each of the
    # candidates for the default (γ = 3, 10, 30), two each of γ = 50 and 100 (the screens above
    # the default) and one of γ = 1, and the final
    # architectures of γ = 30 (the default when they ran) and 10, and of γ = 3's seed 2, trained from scratch.
    "hopper": Grid({"dense": "--no-gates", **FRONTIER, **{f"small_g{g}": "--no-gates" for g in (3, 10, 30)}},
                   seeds=(1, 2, 3, 4, 5, 6, 7),
                   fewer_seeds={**{c: (1, 2, 3) for c in (*FRONTIER, "small_g10", "small_g30")},
                                "flip_g1": (1,), "flip_g50": (1, 2), "flip_g100": (1, 2), "small_g3": (2,)},
                   arch_from={f"small_g{g}": f"flip_g{g}" for g in (3, 10, 30)}),
    # The hopper grid's old default (γ = 30, gating from 10k) again, with the code of a gate step
    # every fourth update (--gate-every 4), against that grid's flip_g30 from the code with one at
    # every update; and with gating held back until 30k steps (`late`), with each seed's final
    # architecture of it trained from scratch; and γ = 10 from 30k (the default since), as on
    # HalfCheetah and Walker2d, with its architectures from scratch; the last four on seeds 1-5,
    # the default and its twins also on seeds 6-7 (pruned - scratch was unresolved on five).
    "hopper_recheck": Grid({"flip_g30": FRONTIER["flip_g30"], "late": LATE, "small_late": "--no-gates", **G10},
                           seeds=(1, 2, 3, 4, 5, 6, 7),
                           fewer_seeds={"flip_g30": (1, 2, 3), "late": (1, 2, 3, 4, 5), "small_late": (1, 2, 3, 4, 5)},
                           arch_from={"small_late": "late", "small_g10": "xinet_g10"}),
    # Beyond Hopper: plain SAC, the dense agent, XiNet at the default of the time (γ = 30, gating
    # from 30k steps, 20k updates after the random steps) and each seed's final XiNet architecture
    # trained from scratch; on HalfCheetah also gating from 10k (the default before) and its
    # architectures; and a third of that price (γ = 10 from 30k, now the default) with its
    # architectures from scratch: is γ = 30's loss to dense the size it leaves? Every configuration
    # on seeds 1-5; dense, the default and its twins also on 6-7 (the default's loss to dense was
    # unresolved on five), and plain SAC, so that dense - SAC pairs on seven seeds as on Hopper.
    "halfcheetah": Grid({**BEYOND, "xinet": "--prune-start 0 --prune-strength 30", "small": "--no-gates", **G10},
                        seeds=(1, 2, 3, 4, 5, 6, 7),
                        fewer_seeds={c: (1, 2, 3, 4, 5) for c in ("xinet_late", "small_late", "xinet", "small")},
                        arch_from={"small": "xinet", "small_late": "xinet_late", "small_g10": "xinet_g10"},
                        env="HalfCheetah-v4"),
    # On Walker2d also plain SAC at the published learning rates (1e-3 for actor, critics and
    # temperature) and at CleanRL's: the base check, since plain SAC there ends far below
    # published SAC at 100k. And γ = 10 with its architectures from scratch, as on HalfCheetah:
    # does one γ serve all three environments? Every configuration on seeds 1-5, then on 6-7
    # (dense, the default and its twins first: pruned - scratch was unresolved on five). Then the
    # dense agent and the default at 1e-3 (both higher rates beat 3e-4 for plain SAC here): do
    # they gain alike? A screen on seeds 1-2 (the default gained in training return on both),
    # then seeds 3-7 to confirm or refute it.
    "walker2d": Grid({**BEYOND, "sac_lr1e3": f"{SAC} {LR1E3}", "sac_fast": SAC_FAST, **G10,
                      "dense_lr1e3": f"--no-gates {LR1E3}", "xinet_g10_lr1e3": f"{G10['xinet_g10']} {LR1E3}"},
                     seeds=(1, 2, 3, 4, 5, 6, 7),
                     arch_from={"small_late": "xinet_late", "small_g10": "xinet_g10"}, env="Walker2d-v4"),
}


def run_dir(runs: str, grid: str, config: str, seed: int) -> str:
    return os.path.join(runs, grid, config, f"seed{seed}")


def progress(path: str) -> list[dict]:
    try:
        with open(os.path.join(path, "progress.csv")) as f:
            return list(csv.DictReader(f))
    except FileNotFoundError:
        return []


def finished(path: str, steps: int) -> bool:
    rows = progress(path)
    return bool(rows) and int(rows[-1]["step"]) >= steps


def command(runs: str, grid: str, config: str, seed: int) -> list[str] | None:
    """The xinet.py command that brings this run to its total steps: [] when it is there, None
    while the run whose architecture it trains (arch_from) has not finished."""
    g, out = GRIDS[grid], run_dir(runs, grid, config, seed)
    if finished(out, g.steps):
        return []
    arch = []
    if config in g.arch_from:
        source = run_dir(runs, grid, g.arch_from[config], seed)
        if not finished(source, g.steps):
            return None
        arch = ["--arch-from", os.path.join(source, "agent.pt")]
    head = [sys.executable, os.path.join(HERE, "xinet.py")]
    tail = ["--total-steps", str(g.steps), "--threads", "1"]
    if os.path.exists(os.path.join(out, "resume.pt")):
        return head + ["--resume", out] + tail
    flags = f"--env {g.env} --seed {seed} {g.common} {g.configs[config]}"
    return head + shlex.split(flags) + arch + tail + ["--out", out]


def run_one(runs: str, grid: str, config: str, seed: int) -> int:
    out = run_dir(runs, grid, config, seed)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "lock"), "w") as lock:
        try:  # released when this process ends, however it ends
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"{grid}/{config}/seed{seed}: running in another process, skipped", flush=True)
            return 0
        cmd = command(runs, grid, config, seed)
        if cmd is None:
            print(f"{grid}/{config}/seed{seed}: waits for {GRIDS[grid].arch_from[config]}/seed{seed} to finish", flush=True)
        if not cmd:
            return 0
        print(f"{grid}/{config}/seed{seed}: {shlex.join(cmd[1:])}", flush=True)
        with open(os.path.join(out, "stdout.log"), "a") as log:
            return subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)


def bootstrap(values, reps: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """Mean over seeds and its 95% percentile-bootstrap interval (resampling the seeds)."""
    x = np.asarray(values, dtype=float)
    means = np.random.default_rng(seed).choice(x, (reps, len(x))).mean(1)
    return float(x.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


SUMMARY = ("train_return", "eval_return", "params", "flops_per_action", "theta_one", "theta_inside", "theta_settled")


def settled(row: dict) -> float:
    """The smallest share, over the gated networks, of surviving theta exactly at 1."""
    count = lambda k: float(row.get(k) or 0)
    shares = [count(k) / (count(k) + count(k.replace("one", "inside"))) for k in row
              if k.startswith("theta_one_") and count(k) + count(k.replace("one", "inside")) > 0]
    return min(shares, default=float("nan"))


def summarize(rows: list[dict], steps: int) -> dict:
    """One run's statistics of record (the module docstring), from its progress rows."""
    last = rows[-1]
    window = [float(r["train_return"]) for r in rows if int(r["step"]) > 0.9 * steps]
    return {"train_return": float(np.nanmean(window)), "eval_return": float(last["eval_return"]),
            **{k: float(last[k]) for k in SUMMARY[2:-1]}, "theta_settled": settled(last)}


def report(runs: str, grid: str, results: str) -> None:
    g = GRIDS[grid]
    os.makedirs(results, exist_ok=True)
    curves, summary = [], []
    for config in g.configs:
        runs_done = {s: [r for r in progress(run_dir(runs, grid, config, s)) if int(r["step"]) <= g.steps]
                     for s in g.seeds_of(config)}  # a run extended beyond the grid's steps is read up to them
        runs_done = {s: r for s, r in runs_done.items() if r and int(r[-1]["step"]) == g.steps}
        for seed, rows in runs_done.items():
            curves += [{"config": config, "seed": seed, **r} for r in rows]
            summary.append({"config": config, "seed": seed, **summarize(rows, g.steps)})
        if runs_done:
            stats = [s for s in summary if s["config"] == config]
            row = {"config": config, "seed": f"mean of {len(stats)}"}
            for k in SUMMARY:
                row[k], row[f"{k}_lo"], row[f"{k}_hi"] = bootstrap([s[k] for s in stats])
            summary.append(row)
    if not summary:
        sys.exit(f"sweep: no finished run of {grid} under {runs}.")
    for config in set(g.arch_from.values()):
        for seed in {r["seed"] for r in curves if r["config"] == config}:
            agent = os.path.join(run_dir(runs, grid, config, seed), "agent.pt")
            if os.path.exists(agent):  # not for a run whose agent was lost (its progress.csv restored)
                os.makedirs(os.path.join(results, "agents", grid, config), exist_ok=True)
                shutil.copyfile(agent, os.path.join(results, "agents", grid, config, f"seed{seed}.pt"))
    write_csv(os.path.join(results, f"{grid}.csv"), curves)
    write_csv(os.path.join(results, f"{grid}_summary.csv"), summary)
    print_table(summary)
    pairs = paired(summary, g)
    if pairs:
        write_csv(os.path.join(results, f"{grid}_paired.csv"), pairs)
        print_pairs(pairs)
    plot(curves, summary, g, os.path.join(results, f"{grid}.png"))


# The claims table: per environment, each agent's (grid, configuration) in results/<grid>_summary.csv;
# each XiNet configuration with its architectures trained from scratch
SCRATCH = {"xinet": "small", "xinet_late": "small_late", "xinet_g10": "small_g10"}
AGENTS = ("sac", "dense", *[a for pair in SCRATCH.items() for a in pair])
CLAIMS = {"Hopper-v4": {"sac": ("sac_parity", "sac"), "dense": ("hopper", "dense"), "xinet": ("hopper", "flip_g30"),
                        "small": ("hopper", "small_g30"), "xinet_late": ("hopper_recheck", "late"),
                        "small_late": ("hopper_recheck", "small_late"), "xinet_g10": ("hopper_recheck", "xinet_g10"),
                        "small_g10": ("hopper_recheck", "small_g10")},
          **{env: {c: (grid, c) for c in AGENTS}
             for env, grid in (("HalfCheetah-v4", "halfcheetah"), ("Walker2d-v4", "walker2d"))}}


def iqm(x) -> float:
    """Interquartile mean: the mean of the middle half (a quarter of the values cut at each end)."""
    x, cut = np.sort(np.asarray(x, dtype=float)), len(x) // 4
    return float(x[cut:len(x) - cut].mean())


def prob_improvement(x, y) -> float:
    """P(X > Y) for one draw of each (ties count half): how often one agent's run beats the other's."""
    x, y = np.asarray(x, dtype=float)[:, None], np.asarray(y, dtype=float)[None, :]
    return float(((x > y) + 0.5 * (x == y)).mean())


def stratified(stat, samples: dict[str, tuple], reps: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """stat over environments, and its 95% interval from resampling the seeds within each
    environment (the stratified bootstrap): samples maps env -> the arrays stat takes."""
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(reps):
        picked = {}
        for env, arrays in samples.items():
            idx = [rng.integers(len(a), size=len(a)) for a in arrays]
            picked[env] = tuple(np.asarray(a)[i] for a, i in zip(arrays, idx))
        draws.append(stat(picked))
    return stat(samples), float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))


def claims(results: str) -> None:
    """Per environment x agent: final evaluation and training return (mean [95% bootstrap over
    seeds]), parameters and FLOPs per action as % of the dense agent's, and XiNet - from scratch
    paired by seed; across environments, scores normalised by each environment's dense agent:
    the interquartile mean with a stratified bootstrap interval, and P(XiNet beats the small
    architecture trained from scratch)."""
    runs, rows = {}, []
    for env, agents in CLAIMS.items():
        for agent, (grid, config) in agents.items():
            if seeds := per_seed(results, grid, config):
                runs[env, agent] = seeds
    for (env, agent), seeds in runs.items():
        dense = runs.get((env, "dense"))
        row = {"env": env, "agent": agent, "seeds": len(seeds)}
        for k in SUMMARY[:4]:
            row[k], row[f"{k}_lo"], row[f"{k}_hi"] = bootstrap([v[k] for v in seeds.values()])
        for k in ("params", "flops_per_action"):
            row[f"{k}_pct_dense"] = 100 * row[k] / np.mean([v[k] for v in dense.values()]) if dense else float("nan")
        for other, name in ((SCRATCH.get(agent), "small"), ("dense", "dense")):  # its architectures from scratch; dense
            if (env, other) in runs and other != agent:
                diff = difference(seeds, runs[env, other])
                row.update({f"{k}_minus_{name}{part}": diff[k + part] for k in PAIRED for part in ("", "_lo", "_hi", "_ahead")},
                           **{f"seeds_paired_{name}": len(diff["seeds"])})
        rows.append(row)
    envs = [env for env in CLAIMS if (env, "dense") in runs]
    for k in PAIRED:  # normalised by the environment's dense agent (its mean over seeds)
        norm = {(env, agent): np.array([v[k] for v in runs[env, agent].values()]) / np.mean([v[k] for v in runs[env, "dense"].values()])
                for env in envs for agent in CLAIMS[env] if (env, agent) in runs}
        for agent in AGENTS:
            have = [env for env in envs if (env, agent) in norm]
            if have:
                value, lo, hi = stratified(lambda d: iqm(np.concatenate([a for a, in d.values()])),
                                           {env: (norm[env, agent],) for env in have})
                rows.append({"env": f"IQM over {len(have)} env(s), normalised by dense", "agent": agent, "metric": k,
                             "value": value, "lo": lo, "hi": hi})
        for pruned, small in SCRATCH.items():
            both = [env for env in envs if (env, pruned) in norm and (env, small) in norm]
            if both:
                value, lo, hi = stratified(lambda d: float(np.mean([prob_improvement(x, y) for x, y in d.values()])),
                                           {env: (norm[env, pruned], norm[env, small]) for env in both})
                rows.append({"env": f"P({pruned} > {small}) over {len(both)} env(s)", "agent": pruned, "metric": k,
                             "value": value, "lo": lo, "hi": hi})
    write_csv(os.path.join(results, "claims.csv"), rows)
    for r in rows:
        if "metric" in r:
            print(f"| {r['env']} | {r['agent']} | {r['metric']} | {r['value']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}] |")
        else:
            ci = lambda k: f"{r[k]:,.0f} [{r[k + '_lo']:,.0f}, {r[k + '_hi']:,.0f}]"
            diff = f" | {r['train_return_minus_small']:+,.0f} [{r['train_return_minus_small_lo']:+,.0f}, {r['train_return_minus_small_hi']:+,.0f}]" \
                if "train_return_minus_small" in r else " | –"
            print(f"| {r['env']} | {r['agent']} | {r['seeds']} | {ci('eval_return')} | {ci('train_return')} | "
                  f"{r['params_pct_dense']:.0f}% | {r['flops_per_action_pct_dense']:.0f}%{diff} |")
    print("\n| env | agent | minus dense, paired by seed: training return | ahead | final evaluation | ahead |\n|---|---|---|---|---|---|")
    for r in rows:
        if "train_return_minus_dense" in r:
            cells = [f"{r[k + '_minus_dense']:+,.0f} [{r[k + '_minus_dense_lo']:+,.0f}, {r[k + '_minus_dense_hi']:+,.0f}] | "
                     f"{r[k + '_minus_dense_ahead']} of {r['seeds_paired_dense']}" for k in PAIRED]
            print(f"| {r['env']} | {r['agent']} | {' | '.join(cells)} |")


def restore(runs: str, grid: str, results: str) -> None:
    """The inverse of report for finished runs: their progress.csv and archived agent.pt, into
    run directories that do not exist yet."""
    with open(os.path.join(results, f"{grid}.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    for config, seed in dict.fromkeys((r["config"], int(r["seed"])) for r in rows):
        out = run_dir(runs, grid, config, seed)
        if os.path.exists(out):
            continue
        os.makedirs(out)
        write_csv(os.path.join(out, "progress.csv"), [{k: v for k, v in r.items() if k not in ("config", "seed") and v != ""}
                                                      for r in rows if (r["config"], int(r["seed"])) == (config, seed)])
        agent = os.path.join(results, "agents", grid, config, f"seed{seed}.pt")
        if os.path.exists(agent):
            shutil.copyfile(agent, os.path.join(out, "agent.pt"))
        print(f"{grid}/{config}/seed{seed}: restored")


PAIRED = ("train_return", "eval_return")


def per_seed(results: str, grid: str, config: str) -> dict[int, dict[str, float]]:
    """One configuration's statistics of record per seed, from results/<grid>_summary.csv."""
    path = os.path.join(results, f"{grid}_summary.csv")
    if not os.path.exists(path):
        return {}
    with open(path, newline="") as f:
        return {int(r["seed"]): {k: float(r[k]) for k in SUMMARY[:4]}
                for r in csv.DictReader(f) if r["config"] == config and r["seed"].isdigit()}


def difference(a: dict[int, dict], b: dict[int, dict]) -> dict:
    """a - b paired by seed, over the seeds both have (in a's order): per statistic of record the
    differences, their mean with a 95% bootstrap interval, and on how many seeds a is ahead."""
    seeds = [s for s in a if s in b]
    out = {"seeds": seeds}
    for k in PAIRED:
        d = [a[s][k] - b[s][k] for s in seeds]
        out[k], out[f"{k}_lo"], out[f"{k}_hi"] = bootstrap(d)
        out[f"{k}_ahead"], out[f"{k}_per_seed"] = sum(x > 0 for x in d), dict(zip(seeds, d))
    return out


def pairs(results: str, a: str, b: str) -> None:
    """`pairs GRID/CONFIG GRID/CONFIG`: the first minus the second, paired by seed, as the README's
    paired statements are computed (e.g. XiNet - dense, or one learning rate against another)."""
    runs = []
    for spec in (a, b):
        grid, _, config = spec.partition("/")
        runs.append(per_seed(results, grid, config))
        if not runs[-1]:
            sys.exit(f"sweep: no finished run of {spec} in {results} (GRID/CONFIG, e.g. walker2d/dense).")
    if not runs[0].keys() & runs[1].keys():
        sys.exit(f"sweep: {a} and {b} share no seed to pair.")
    diff = difference(*runs)
    for k in PAIRED:
        seeds, base = diff[f"{k}_per_seed"], np.mean([runs[1][s][k] for s in diff[f"{k}_per_seed"]])
        print(f"{a} - {b}, {k}, seeds {', '.join(map(str, seeds))}: {diff[k]:+,.0f} [{diff[k + '_lo']:+,.0f}, "
              f"{diff[k + '_hi']:+,.0f}] ({100 * diff[k] / base:+.1f}% of the second), ahead on {diff[k + '_ahead']} "
              f"of {len(seeds)}; per seed {', '.join(f'{v:+,.0f}' for v in seeds.values())}")


def paired(summary: list[dict], g: Grid) -> list[dict]:
    """Each arch_from configuration against the run whose final architecture it trains from
    scratch, seed by seed, and the difference pruned - from scratch as a mean over seeds with a
    95% bootstrap interval: pairing by seed removes the spread the two runs share."""
    runs = {(s["config"], s["seed"]): s for s in summary if isinstance(s["seed"], int)}
    rows = []
    for small, source in g.arch_from.items():
        pairs = [{"pruned": source, "from_scratch": small, "seed": seed,
                  **{f"{k}_{side}": runs[c, seed][k] for k in PAIRED for side, c in (("pruned", source), ("from_scratch", small))},
                  **{f"{k}_diff": runs[source, seed][k] - runs[small, seed][k] for k in PAIRED}}
                 for c, seed in runs if c == small and (source, seed) in runs]
        if pairs:
            mean = {k: float(np.mean([p[k] for p in pairs])) for k in pairs[0] if k.endswith(("_pruned", "_from_scratch"))}
            for k in PAIRED:
                mean[f"{k}_diff"], mean[f"{k}_diff_lo"], mean[f"{k}_diff_hi"] = bootstrap([p[f"{k}_diff"] for p in pairs])
            rows += pairs + [{"pruned": source, "from_scratch": small, "seed": f"mean of {len(pairs)}", **mean}]
    return rows


def print_pairs(pairs: list[dict]) -> None:
    print("\n| pruned | from scratch | seed | train return: pruned | from scratch | difference "
          "| final eval: pruned | from scratch | difference |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in pairs:
        interval = lambda k: f" [{r[k + '_diff_lo']:+.0f}, {r[k + '_diff_hi']:+.0f}]" if r.get(k + "_diff_lo", 0) != r.get(k + "_diff_hi", 0) else ""
        cells = [f"{r[k + '_pruned']:.0f} | {r[k + '_from_scratch']:.0f} | {r[k + '_diff']:+.0f}{interval(k)}" for k in PAIRED]
        print(f"| {r['pruned']} | {r['from_scratch']} | {r['seed']} | {' | '.join(cells)} |")


def write_csv(path: str, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def print_table(summary: list[dict]) -> None:
    print("| config | seed | train return (last 10%) | final eval | params | FLOPs/action | θ at 1 | θ in (0,1) "
          "| share at 1, worst network |")
    print("|---|---|---|---|---|---|---|---|---|")
    for s in summary:
        cell = lambda k, f: ("–" if np.isnan(s[k]) else f"{s[k]:{f}} [{s[k + '_lo']:{f}}, {s[k + '_hi']:{f}}]"
                             if s.get(f"{k}_lo", s[k]) != s.get(f"{k}_hi", s[k]) else f"{s[k]:{f}}")  # no interval: one value
        gates = "| – | – | –" if np.isnan(s["theta_settled"]) else \
            f"| {cell('theta_one', '.0f')} | {cell('theta_inside', '.0f')} | {cell('theta_settled', '.0%')}"
        print(f"| {s['config']} | {s['seed']} | {cell('train_return', '.0f')} | {cell('eval_return', '.0f')} | "
              f"{cell('params', ',.0f')} | {cell('flops_per_action', ',.0f')} {gates} |")


def plot(curves: list[dict], summary: list[dict], g: Grid, path: str) -> None:
    """Learning curves (eval and training return) and parameters over time, mean over seeds with
    a 95% bootstrap band; final return against parameters, with intervals on both."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    for k, config in enumerate(g.configs):
        rows = [r for r in curves if r["config"] == config]
        if not rows:
            continue
        color, label = f"C{k}", f"{config} ({len({r['seed'] for r in rows})} seeds)"
        steps = sorted({int(r["step"]) for r in rows})
        for ax, key in zip(axes[:3], ("eval_return", "train_return", "params")):
            stats = [bootstrap([float(r[key]) for r in rows if int(r["step"]) == s and r[key] != "nan"] or [np.nan])
                     for s in steps]
            mean, lo, hi = np.array(stats).T
            ax.plot(steps, mean, color=color, label=label)
            ax.fill_between(steps, lo, hi, color=color, alpha=0.2)
        agg = next(s for s in summary if s["config"] == config and "params_lo" in s)
        axes[3].errorbar(agg["params"], agg["train_return"], color=color, fmt="o", label=label,
                         xerr=[[agg["params"] - agg["params_lo"]], [agg["params_hi"] - agg["params"]]],
                         yerr=[[agg["train_return"] - agg["train_return_lo"]], [agg["train_return_hi"] - agg["train_return"]]])
    titles = ("evaluation return", "training return", "parameters", "return (last 10%) vs parameters")
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("parameters" if ax is axes[3] else "environment steps")
        ax.grid(alpha=0.3)
    axes[2].set_yscale("log")
    axes[3].set_xscale("log")
    axes[0].legend()
    fig.suptitle(f"{g.env}: mean and 95% bootstrap interval over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="sweep.py", description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("run", "commands", "report", "one", "restore", "claims", "pairs"))
    p.add_argument("grid", nargs="?", help=f"every action but claims: one of {', '.join(GRIDS)}; pairs: GRID/CONFIG")
    p.add_argument("config", nargs="?", help="one: the configuration; pairs: the GRID/CONFIG subtracted")
    p.add_argument("seed", nargs="?", type=int, help="for one: the seed")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each (run)")
    p.add_argument("--runs", default=os.path.join(HERE, "runs"), help="where run directories live")
    p.add_argument("--results", default=os.path.join(HERE, "results"), help="where report writes")
    a = p.parse_args(argv)
    if a.action == "claims":
        return claims(a.results) or 0
    if a.action == "pairs":
        if a.config is None:
            p.error("pairs takes two GRID/CONFIG, e.g. walker2d/xinet_g10 walker2d/dense")
        return pairs(a.results, a.grid, a.config) or 0
    if a.grid not in GRIDS:
        p.error(f"{a.action} takes a grid: one of {', '.join(GRIDS)}")
    g = GRIDS[a.grid]
    todo = [(c, s) for s in g.seeds for c in g.configs if s in g.seeds_of(c)]  # every config gets seed 1 first
    phases = [[cs for cs in todo if cs[0] not in g.arch_from], [cs for cs in todo if cs[0] in g.arch_from]]
    if a.action == "one":
        if a.config not in g.configs or a.seed is None:
            p.error(f"one takes a configuration of {a.grid} ({', '.join(g.configs)}) and a seed")
        return run_one(a.runs, a.grid, a.config, a.seed)
    if a.action == "restore":
        return restore(a.runs, a.grid, a.results) or 0
    if a.action == "commands":
        for c, s in phases[0] + phases[1]:
            if command(a.runs, a.grid, c, s):
                print(shlex.join(["python", os.path.relpath(__file__), "one", a.grid, c, str(s), "--runs", os.path.relpath(a.runs)]))
        return 0
    if a.action == "run":
        codes = []
        for phase in phases:  # the architectures trained from scratch once their sources have finished
            with ThreadPoolExecutor(a.jobs) as pool:
                codes += pool.map(lambda cs: run_one(a.runs, a.grid, *cs), phase)
        if any(codes):
            print(f"sweep: {sum(1 for c in codes if c)} run(s) failed; see their stdout.log", file=sys.stderr)
            return 1
    report(a.runs, a.grid, a.results)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except OSError as e:  # e.g. --results or --runs that does not exist or cannot be written
        sys.exit(f"sweep: error: {e.filename}: {e.strerror}.")
