"""Central vs federated on the same split, model, dimension and seeds."""

from __future__ import annotations

import dataclasses

from fedrec.run.config import RunConfig
from fedrec.run.rundir import main_metric, make_run_dir, plot_metric, write_history, write_json


def run_compare(cfg: RunConfig, central_fn, federated_fn) -> dict:
    run_dir = make_run_dir(cfg, "compare")
    central = central_fn(dataclasses.replace(cfg, out=str(run_dir / "central")))
    federated = federated_fn(dataclasses.replace(cfg, out=str(run_dir / "federated")))
    c, f = central.summary["metrics"], federated.summary["metrics"]
    gap = {k: f[k] - c[k] for k in c if k in f}
    report = {"central": central.summary, "federated": federated.summary, "gap": gap}
    write_json(run_dir / "summary.json", report)
    metric = main_metric(cfg.implicit, cfg.top_k)
    frame = write_history(run_dir, federated.history, "federated_metrics.csv")
    plot_metric(frame, "round", metric, run_dir / "comparison.png",
                f"{cfg.dataset} {cfg.split}: federated {metric} per round vs central", reference=c.get(metric))
    lines = [f"# Central vs federated: {cfg.dataset}, split {cfg.split}", "",
             f"Same model (biased MF, K={cfg.dim}), split and seed ({cfg.seed}). Central: {cfg.epochs} full-batch "
             f"epochs; federated: {cfg.rounds} rounds, strategy {cfg.strategy}, "
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
