"""Central vs federated on the same split, model, dimension and seeds; with a tuner, each side
first gets its own settings chosen on a validation split of the training data (tune.json)."""

from __future__ import annotations

import dataclasses

from fedrec.run.config import RunConfig
from fedrec.run.rundir import main_metric, make_run_dir, plot_metric, write_history, write_json

from .tune import apply


def run_compare(cfg: RunConfig, central_fn, federated_fn, tune_fn=None) -> dict:
    """`tune_fn(run_dir)`, if given, writes tune.json there and returns its report, whose chosen
    settings each side then runs with (central with central's, federated with federated's)."""
    # --model auto decided once, on the whole run's settings: central ignores federated-only ones
    # (--users-per-round), and on its own would pick BPMF beside a federated MF
    cfg = dataclasses.replace(cfg, model=cfg.resolved().model)
    run_dir = make_run_dir(cfg, "compare")
    chosen = tune_fn(run_dir)["chosen"] if tune_fn else {}
    sides = {side: apply(cfg, side, chosen[side]) if side in chosen else cfg for side in ("central", "federated")}
    central = central_fn(dataclasses.replace(sides["central"], out=str(run_dir / "central")))
    federated = federated_fn(dataclasses.replace(sides["federated"], out=str(run_dir / "federated")))
    c, f = central.summary["metrics"], federated.summary["metrics"]
    gap = {k: f[k] - c[k] for k in c if k in f}
    report = {"central": central.summary, "federated": federated.summary, "gap": gap}
    if chosen:
        report["tuned"] = chosen
    write_json(run_dir / "summary.json", report)
    metric = main_metric(cfg.implicit, cfg.top_k)
    frame = write_history(run_dir, federated.history, "federated_metrics.csv")
    plot_metric(frame, "round", metric, run_dir / "comparison.png",
                f"{cfg.dataset} {cfg.split}: federated {metric} per round vs central", reference=c.get(metric))
    central_cfg, fed_cfg = sides["central"], sides["federated"]
    names = {"svdpp": "SVD++", "bpmf": "Bayesian MF by Gibbs sampling", "mf": "biased MF"}
    model = f"Same model ({names[central_cfg.resolved().model]}, K={central_cfg.resolved().dim}),"
    if chosen:
        model = (f"Each side's settings chosen on a validation split of the training data (tune.json): central "
                 f"K={central_cfg.dim}, federated K={fed_cfg.dim}; same")
    lines = [f"# Central vs federated: {cfg.dataset}, split {cfg.split}", "",
             f"{model} split and seed ({cfg.seed}). Central: {central_cfg.epochs} full-batch "
             f"epochs; federated: {fed_cfg.rounds} rounds, strategy {cfg.strategy}, "
             f"{cfg.users_per_round or 'all'} users per round.", "",
             "| metric | central | federated | gap (fed - central) | ratio |", "|---|---|---|---|---|"]
    for k in gap:
        lines.append(f"| {k} | {c[k]:.4f} | {f[k]:.4f} | {gap[k]:+.4f} | {f[k] / c[k]:.4f} |")
    wall = f"central {central.summary['wall_seconds']:.1f} s"
    if "wall_seconds" in federated.summary:  # a DP run does not release its timing
        wall += f", federated {federated.summary['wall_seconds']:.1f} s"
    lines += ["", f"Wall time: {wall}. Plot: comparison.png."]
    (run_dir / "comparison.md").write_text("\n".join(lines) + "\n")
    report["run_dir"] = run_dir
    return report
