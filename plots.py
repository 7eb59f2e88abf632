"""The alignment lab's analysis and figures: the over-optimization curve and its fit (Gao, Schulman, Hilton 2023),
the ensemble bars, the scale chart, and mean +- std over seeds. launch.sh calls it after each mode; every
subcommand writes a PNG, a .md table and a .json next to the report it reads.

    python plots.py gao --runs=beta=0:runs/ppo_beta0,beta=0.1:runs/ppo_beta0.1 --out=runs/ablate_kl
    python plots.py bars --report=runs/ablate_ensemble/report.json --out=runs/ablate_ensemble
    python plots.py scale --report=runs/scale/report.json --params=runs/scale/params.json --out=runs/scale
    python plots.py seeds --reports=runs/seed0/ablate_kl/report.json,runs/seed1/... --out=runs/ablate_kl_seeds
    python plots.py rlvr --runs=grpo:runs/s0/grpo+runs/s1/grpo,rloo:runs/s0/rloo --metric=arithmetic_reward --out=runs/rlvr

The math (gao_rl_fit, gao_peak, mean_std) is in small pure functions; tests/test_lab.py checks them on synthetic
data with known answers.
"""

import json
import math
import os
import sys

import torch


# -----------------------------------------------------------------------------
# The math


def gao_rl_fit(d: torch.Tensor, r: torch.Tensor) -> tuple[float, float]:
    """Least-squares fit of Gao et al.'s RL form R(d) = d (alpha - beta log d) (Gao, Schulman, Hilton 2023,
    "Scaling Laws for Reward Model Overoptimization", its functional form for RL; ../shared/REFERENCES.md 4.4; R(0) = 0), to points d (N,) > 0,
    r (N,): returns (alpha, beta). R is the gold reward gained over the initial policy and d = sqrt(KL(pi || pi_init))
    in nats. The form is linear in (alpha, beta): R = alpha * d - beta * d log d, so ordinary least squares on the
    two columns [d, -d log d] (no intercept) solves it exactly; points at d = 0 carry no information (both
    columns are 0) and are dropped. float64, so the 2x2 normal equations do not lose digits."""
    d, r = d.double(), r.double()
    keep = d > 0
    d, r = d[keep], r[keep]
    if d.numel() < 2:
        raise ValueError(f"gao_rl_fit needs at least two points with d > 0, got {d.numel()}")
    X = torch.stack([d, -d * torch.log(d)], 1)  # (N, 2)
    coef = torch.linalg.lstsq(X, r[:, None]).solution.squeeze(1)
    return coef[0].item(), coef[1].item()


def gao_rl(d: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """R(d) = d (alpha - beta log d), with R(0) = 0 (the limit)."""
    d = d.double()
    safe = torch.where(d > 0, d, torch.ones_like(d))
    return torch.where(d > 0, d * (alpha - beta * torch.log(safe)), torch.zeros_like(d))


def gao_peak(alpha: float, beta: float) -> tuple[float, float] | None:
    """Where the fitted gold curve peaks: dR/dd = alpha - beta log d - beta = 0 at d* = exp(alpha / beta - 1),
    R(d*) = beta d*. None when beta <= 0 (the curve never turns down: no over-optimization in the fit)."""
    if beta <= 0:
        return None
    d_star = math.exp(alpha / beta - 1.0)
    return d_star, beta * d_star


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value) of a column over seeds."""
    n = len(values)
    mean = sum(values) / n
    return mean, (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else 0.0


# -----------------------------------------------------------------------------
# Reading runs


def eval_curve(metrics_path: str) -> list[dict]:
    """The periodic evaluations of one PPO run, in order: {step, d = sqrt(max(KL, 0)), kl, gold, learned}. The
    held-out KL is a k1 sample mean and can come out slightly negative near 0; d clips it at 0."""
    rows = [json.loads(line) for line in open(metrics_path) if line.strip()]
    return [{"step": r["step"], "kl": r["eval/kl"], "d": math.sqrt(max(r["eval/kl"], 0.0)),
             "gold": r.get("eval/gold_reward", float("nan")), "learned": r["eval/learned_reward"]}
            for r in rows if "eval/kl" in r and "eval/learned_reward" in r]


def gao_analysis(runs: dict[str, str]) -> dict:
    """For each run (name -> PPO run dir with metrics.jsonl): its curve and gao_fit of it."""
    return {name: gao_fit([eval_curve(os.path.join(run_dir, "metrics.jsonl"))]) for name, run_dir in runs.items()}


def gao_fit(curves: list[list[dict]]) -> dict:
    """Gao et al.'s fit of the gold gain against d, over one run's curve or several seeds' curves of the same
    setting: each point's gain is over its own run's step-0 evaluation (ppo.py --eval_at_start), and the points of
    all runs are pooled into one least-squares fit. "curve" is the step-by-step mean over the runs (every run
    evaluates at the same steps); the measured best is that mean curve's. Runs without a step-0 evaluation are
    not fitted."""
    curve = mean_curve(curves)
    entry = {"curve": curve, "num_runs": len(curves)}
    fitted_runs = [c for c in curves if c and c[0]["step"] == 0 and len(c) >= 3]
    if len(fitted_runs) == len(curves) and curves:
        d = torch.tensor([p["d"] for c in curves for p in c])
        gain = torch.tensor([p["gold"] - c[0]["gold"] for c in curves for p in c])
        alpha, beta = gao_rl_fit(d, gain)
        best = max(curve, key=lambda p: p["gold"])
        entry.update(gold0=curve[0]["gold"], alpha=alpha, beta=beta, peak=gao_peak(alpha, beta),
                     rmse=((gao_rl(d, alpha, beta) - gain.double()) ** 2).mean().sqrt().item(),
                     measured_peak={"d": best["d"], "gold": best["gold"], "step": best["step"]})
    return entry


def mean_curve(curves: list[list[dict]]) -> list[dict]:
    """The step-by-step mean of several runs' eval_curve rows (steps all runs have), in step order."""
    steps = sorted(set.intersection(*(set(p["step"] for p in c) for c in curves))) if curves else []
    by_step = [{p["step"]: p for p in c} for c in curves]
    return [{"step": s, **{k: sum(c[s][k] for c in by_step) / len(by_step) for k in ("kl", "d", "gold", "learned")}}
            for s in steps]


# -----------------------------------------------------------------------------
# Figures (matplotlib, Agg: no display needed)


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_gao(analysis: dict, out_png: str):
    """Left: gold (solid, with the fit dashed) against d = sqrt(KL); right: learned reward against d; a line per run."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, (name, entry) in enumerate(analysis.items()):
        color = f"C{i}"
        d = [p["d"] for p in entry["curve"]]
        axes[0].plot(d, [p["gold"] for p in entry["curve"]], "o-", color=color, ms=3, label=name)
        axes[1].plot(d, [p["learned"] for p in entry["curve"]], "o-", color=color, ms=3, label=name)
        if "alpha" in entry:
            grid = torch.linspace(0, max(d), 100)
            axes[0].plot(grid, entry["gold0"] + gao_rl(grid, entry["alpha"], entry["beta"]), "--", color=color, lw=1)
    axes[0].set_xlabel("d = sqrt(KL to SFT), nats^1/2"), axes[0].set_ylabel("gold reward (held-out)")
    axes[0].set_title("gold; dashed: fit d(a - b log d)")
    axes[1].set_xlabel("d = sqrt(KL to SFT), nats^1/2"), axes[1].set_ylabel("learned reward (held-out)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)


def plot_bars(report: dict, out_png: str):
    """Gold and learned reward and KL per policy of a report (the ensemble ablation), error bars if over seeds."""
    plt = _plt()
    names = list(report["policies"])
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, key, title in zip(axes, ("gold_reward", "learned_reward", "kl_to_reference"),
                              ("gold reward", "learned reward", "KL to SFT (nats/seq)")):
        vals = [report["policies"][n].get(key, float("nan")) for n in names]
        errs = [report["policies"][n].get(key + "_std", 0.0) for n in names]
        ax.bar(range(len(names)), vals, yerr=errs, color=[f"C{i}" for i in range(len(names))], capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)


def plot_scale(report: dict, params: dict, out_png: str):
    """Gold reward of each policy against its parameter count (log x): SFT at each size, PPO on the smallest."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, row in report["policies"].items():
        n = params.get(name)
        if n is None:
            continue
        marker, color = ("*", "C3") if name.startswith("ppo") else ("o", "C0")
        ax.errorbar([n], [row["gold_reward"]], yerr=[row.get("gold_reward_std", 0.0)], fmt=marker, color=color, ms=10)
        ax.annotate(name, (n, row["gold_reward"]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xscale("log"), ax.set_xlabel("parameters"), ax.set_ylabel("gold reward (held-out)")
    ax.set_title("SFT at each size vs PPO on the smallest")
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)


# -----------------------------------------------------------------------------
# Subcommands


def write(out: str, name: str, obj: dict, md: list[str]):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, name + ".json"), "w") as f:
        json.dump(obj, f, indent=2)
    with open(os.path.join(out, name + ".md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


def cmd_gao(runs: str, out: str):
    write_gao(gao_analysis(dict(item.split(":", 1) for item in runs.split(","))), out)


def write_gao(analysis: dict, out: str, title_note: str = ""):
    """out/gao.{png,md,json}: the fits' table and the figure."""
    md = ["# Over-optimization: gold reward vs d = sqrt(KL) (Gao et al. 2023 RL form, R(d) = d(alpha - beta log d))"
          + title_note, "",
          "| run | gold at d=0 | alpha | beta | fitted peak d* | fitted peak gold | fit RMSE | measured best gold (d, update) | final gold | final d |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for name, e in analysis.items():
        last = e["curve"][-1] if e["curve"] else None
        if "alpha" not in e:
            md.append(f"| {name} | (no step-0 evaluation: not fitted) |||||||||")
            continue
        peak = e["peak"]
        max_d = max(p["d"] for p in e["curve"])
        if peak is None:
            peak_s = "none (beta <= 0) | -"
        elif peak[0] > max_d:  # a near-zero beta puts d* = exp(alpha / beta - 1) far out: an extrapolation, not a peak
            peak_s = f"beyond the data (d* = {peak[0]:.3g} > {max_d:.2f}) | -"
        else:
            peak_s = f"{peak[0]:.2f} | {e['gold0'] + peak[1]:.3f}"
        m = e["measured_peak"]
        md.append(f"| {name} | {e['gold0']:.3f} | {e['alpha']:.3f} | {e['beta']:.3f} | {peak_s} | {e['rmse']:.3f} | "
                  f"{m['gold']:.3f} ({m['d']:.2f}, {m['step']}) | {last['gold']:.3f} | {last['d']:.2f} |")
    plot_gao(analysis, os.path.join(out, "gao.png"))
    md += ["", "![gold and learned reward vs sqrt(KL)](gao.png)"]
    write(out, "gao", analysis, md)


def cmd_bars(report: str, out: str):
    rep = json.load(open(report))
    plot_bars(rep, os.path.join(out, "bars.png"))
    print(f"plots: {out}/bars.png")


def cmd_scale(report: str, params: str, out: str):
    rep, n_params = json.load(open(report)), json.load(open(params))
    md = ["# Scale: SFT at each size vs PPO on the smallest", "", "| policy | parameters | gold reward | KL to the smallest SFT (meaningful for its PPO only) |",
          "|---|---|---|---|"]
    for name, row in rep["policies"].items():
        md.append(f"| {name} | {n_params.get(name, 0):,} | {row['gold_reward']:.3f} | {row['kl_to_reference']:.3f} |")
    plot_scale(rep, n_params, os.path.join(out, "scale.png"))
    md += ["", "![gold reward vs parameters](scale.png)"]
    write(out, "scale", {"policies": rep["policies"], "params": n_params}, md)


def cmd_seeds(reports: str, out: str):
    """report.json of the same mode over several seeds -> one report of mean and std per policy and column."""
    reps = [json.load(open(p)) for p in reports.split(",")]
    cols = ("gold_reward", "learned_reward", "kl_to_reference", "response_length", "eos_fraction")
    policies = {}
    for name in reps[0]["policies"]:
        row = {}
        for c in cols:
            vals = [r["policies"][name][c] for r in reps if c in r["policies"].get(name, {})]
            if len(vals) == len(reps):
                row[c], row[c + "_std"] = mean_std(vals)
        policies[name] = row
    shown = [c for c in cols if any(c in row for row in policies.values())]
    md = [f"# Mean +- std over {len(reps)} seeds", "", "| policy | " + " | ".join(shown) + " |", "|---" * (len(shown) + 1) + "|"]
    for name, row in policies.items():
        md.append(f"| {name} | " + " | ".join(f"{row[c]:.3f} +- {row[c + '_std']:.3f}" for c in shown) + " |")
    md += ["", "Reports: " + ", ".join(reports.split(","))]
    summary = {"num_seeds": len(reps), "policies": policies, "reports": reports.split(",")}
    write(out, "report", summary, md)
    plot_bars(summary, os.path.join(out, "bars.png"))
    # The modes with over-optimization curves (ablate-kl, ablate-ensemble) wrote gao.json beside each report: pool
    # each run's seeds into one fit and a mean curve.
    gao_files = [os.path.join(os.path.dirname(p), "gao.json") for p in reports.split(",")]
    if all(os.path.isfile(f) for f in gao_files):
        per_seed = [json.load(open(f)) for f in gao_files]
        analysis = {name: gao_fit([seed[name]["curve"] for seed in per_seed]) for name in per_seed[0]}
        write_gao(analysis, out, f"; {len(per_seed)} seeds pooled, mean curves")


def accuracy_curve(metrics_path: str, metric: str) -> list[dict]:
    """The held-out evaluations of one RLVR run: {step, sampled, greedy} = the mean of reward function `metric` at the
    sampling temperature (eval/rewards/<metric>/mean) and greedily (eval/greedy/..., NaN without --eval_greedy)."""
    rows = [json.loads(line) for line in open(metrics_path) if line.strip()]
    key = f"rewards/{metric}/mean"
    return [{"step": r["step"], "sampled": r[f"eval/{key}"], "greedy": r.get(f"eval/greedy/{key}", float("nan"))}
            for r in rows if f"eval/{key}" in r]


def before_after(metrics_path: str) -> tuple[list[int], list[tuple[dict, dict]]]:
    """The held-out samples that ppo.py logs at each evaluation (eval/samples: the same prompts every time, sampled
    and greedy answers with their scores), at the first and the last evaluation: ([step0, step1], [(before, after)])."""
    rows = [json.loads(line) for line in open(metrics_path) if line.strip()]
    evals = [r for r in rows if r.get("eval/samples")]
    if not evals:
        return [], []
    return [evals[0]["step"], evals[-1]["step"]], list(zip(evals[0]["eval/samples"], evals[-1]["eval/samples"]))


def answer_cell(sample: dict, greedy: bool) -> str:
    """One logged answer as a Markdown table cell: the text, then its reward in brackets."""
    text, score = (sample.get("greedy"), sample.get("greedy_score")) if greedy else (sample["response"], sample["score"])
    if text is None:
        return "-"
    return "`" + text.replace("|", "\\|").replace("`", "'") + f"` ({score:.0f})"


def cmd_rlvr(runs: str, metric: str, out: str):
    """RLVR runs (name:dir+dir+... one dir per seed) -> held-out accuracy before and after, sampled and greedy,
    mean +- std over seeds (rlvr.md/.json), and the curves against updates (rlvr.png)."""
    table, curves, examples = {}, {}, {}
    for item in runs.split(","):
        name, dirs = item.split(":", 1)
        per_seed = [accuracy_curve(os.path.join(d, "metrics.jsonl"), metric) for d in dirs.split("+")]
        curves[name] = per_seed
        logged = [(d, before_after(os.path.join(d, "metrics.jsonl"))) for d in dirs.split("+")]
        examples[name] = next(((d, *ba) for d, ba in logged if ba[1]), (None, [], []))  # the first seed that has them
        row = {"seeds": len(per_seed), "updates": per_seed[0][-1]["step"]}
        for kind in ("sampled", "greedy"):
            for when, i in (("before", 0), ("after", -1)):
                row[f"{kind}_{when}"], row[f"{kind}_{when}_std"] = mean_std([c[i][kind] for c in per_seed])
            row[f"{kind}_gain"], row[f"{kind}_gain_std"] = mean_std([c[-1][kind] - c[0][kind] for c in per_seed])
        table[name] = row
    md = [f"# RLVR: held-out accuracy ({metric}), mean +- std over seeds", "",
          "| run | seeds | updates | sampled before | sampled after | gain | greedy before | greedy after | gain |",
          "|---|---|---|---|---|---|---|---|---|"]
    for name, r in table.items():
        cell = lambda k: f"{r[k]:.3f} +- {r[k + '_std']:.3f}"  # noqa: E731
        md.append(f"| {name} | {r['seeds']} | {r['updates']} | {cell('sampled_before')} | {cell('sampled_after')} | "
                  f"{cell('sampled_gain')} | {cell('greedy_before')} | {cell('greedy_after')} | {cell('greedy_gain')} |")
    for name, (run_dir, steps, rows) in examples.items():
        if not rows:
            continue
        md += ["", f"## {name}: the first held-out problems at update {steps[0]} and {steps[1]} ({run_dir}; reward in "
               "brackets)", "",
               "| prompt (its end) | greedy before | greedy after | sampled before | sampled after |", "|---|---|---|---|---|"]
        for p, q in rows:
            md.append(f"| `{p['prompt'][-80:]}` | {answer_cell(p, True)} | {answer_cell(q, True)} | "
                      f"{answer_cell(p, False)} | {answer_cell(q, False)} |".replace("\n", " "))
    write(out, "rlvr", {"metric": metric, "runs": table, "curves": curves,
                        "samples": {n: {"run": rd, "steps": st, "before_after": r} for n, (rd, st, r) in examples.items()}},
          md)
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, kind in zip(axes, ("sampled", "greedy")):
        for name, per_seed in curves.items():
            for s, c in enumerate(per_seed):
                ax.plot([p["step"] for p in c], [p[kind] for p in c], marker="o", ms=3, alpha=0.8,
                        label=name if s == 0 else None, color=f"C{list(curves).index(name)}")
        ax.set_xlabel("update")
        ax.set_title(f"held-out accuracy, {kind}" + (" (T = 1)" if kind == "sampled" else " (T = 0)"))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(metric)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "rlvr.png"), dpi=120)
    plt.close(fig)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    commands = {"gao": cmd_gao, "bars": cmd_bars, "scale": cmd_scale, "seeds": cmd_seeds, "rlvr": cmd_rlvr}
    if not argv or argv[0] not in commands:
        raise SystemExit(f"usage: python plots.py {{{'|'.join(commands)}}} --key=value ... (see the docstring)")
    kwargs = {}
    for a in argv[1:]:
        if not a.startswith("--") or "=" not in a:
            raise SystemExit(f"plots.py: expected --key=value, got {a!r}")
        key, value = a[2:].split("=", 1)
        kwargs[key] = value
    if "out" in kwargs:
        os.makedirs(kwargs["out"], exist_ok=True)
    try:
        commands[argv[0]](**kwargs)
    except TypeError as e:
        raise SystemExit(f"plots.py {argv[0]}: {e}")


if __name__ == "__main__":
    main()
