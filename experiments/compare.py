"""Central vs federated on the same split, model, dimension and seeds; with a tuner, each side
first gets its own settings chosen on a validation split of the training data (tune.json)."""

from __future__ import annotations

import dataclasses

from fedrec.run.config import RunConfig, applies
from fedrec.run.rundir import dp_label, main_metric, make_run_dir, plot_metric, write_history, write_json

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
    label = dp_label(federated.summary["privacy"])
    title = f"{cfg.dataset} {cfg.split}: federated {metric} per round vs central"
    plot_metric(frame, "round", metric, run_dir / "comparison.png", f"{title}\n{label}" if label else title,
                reference=c.get(metric))
    lines = comparison_lines(cfg, sides["central"].resolved(), sides["federated"].resolved(), central.summary,
                             federated.summary, bool(chosen))
    (run_dir / "comparison.md").write_text("\n".join(lines) + "\n")
    report["run_dir"] = run_dir
    return report


def model_title(model: str) -> str:
    """What reports call a model: its algorithm's own title."""
    from fedrec.models.registry import algorithm_class

    return algorithm_class(model).title


def comparison_lines(cfg: RunConfig, central_cfg: RunConfig, fed_cfg: RunConfig, central: dict, federated: dict,
                     tuned: bool) -> list[str]:
    """comparison.md: the models and why, the settings that acted on each side, the table, what each
    side protects (a DP run's epsilon, delta and z beside it)."""
    lines = [f"# Central vs federated: {cfg.dataset}, split {cfg.split}", ""]
    if central_cfg.model == fed_cfg.model:
        lines.append(f"Model: {model_title(fed_cfg.model)} ({fed_cfg.model_reason()}).")
    else:  # tuning may choose each side's model: the gap then mixes model and federation
        lines.append(f"**The two sides train different models**: central {model_title(central_cfg.model)}, federated "
                     f"{model_title(fed_cfg.model)}; the gap below is not federation's cost alone.")
    if tuned:
        lines.append("Each side's settings were chosen on a validation split of the training data (tune.json).")
    fed = [f"{fed_cfg.rounds} rounds", f"{cfg.users_per_round or 'all'} users per round ({cfg.sampling})"]
    fed += [f"{name.replace('_', '-')} {getattr(fed_cfg, name)}" for name in ("strategy", "server_lr", "lr",
                                                                            "local_epochs")
            if applies(fed_cfg, name)]
    lines += [f"Same split and seed ({cfg.seed}); K = {central_cfg.dim} central, {fed_cfg.dim} federated. Central: "
              f"{central_cfg.epochs} full-batch epochs; federated: {', '.join(fed)}.", "",
              "| metric | central | federated | gap (fed - central) | ratio |", "|---|---|---|---|---|"]
    c, f = central["metrics"], federated["metrics"]
    lines += [f"| {k} | {c[k]:.4f} | {f[k]:.4f} | {f[k] - c[k]:+.4f} | {f[k] / c[k]:.4f} |" for k in c if k in f]
    privacy = federated["privacy"]
    label = dp_label(privacy)
    lines += ["", f"Federated run's privacy{f' ({label})' if label else ''}: {privacy['guarantee']}."]
    if label:
        lines.append("The central side is the non-private baseline, trained on the same users' data without noise: "
                     "its model and metrics are not covered by the federated run's epsilon; do not release them "
                     "beside it.")
    wall = f"central {central['wall_seconds']:.1f} s"
    if "wall_seconds" in federated:  # a DP run does not release its timing
        wall += f", federated {federated['wall_seconds']:.1f} s"
    return lines + ["", f"Wall time: {wall}. Plot: comparison.png."]
