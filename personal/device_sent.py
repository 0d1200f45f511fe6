"""What else left a device in a run, besides the item-side statistics its upload log lists, and what
they give away: short, honest sentences for the device page (device_view.DeviceView.also_sent)."""

from __future__ import annotations

from fedrec.run.config import RunConfig

CENTRAL = ("a central run: every rating of this user was pooled on one server, which also trained the user's "
           "vector and bias there; nothing stayed on a device")
READABLE = ("each upload's statistics are computed from this user's vector and ratings, and the server sees them as "
            "sent (no secure aggregation, no noise added on the device): from an upload of this user alone it can "
            "compute both (summary.json, privacy: against_server)")
LOOKS_LIKE_A_FAILURE = ("to the server (and, in runs without DP, to readers of metrics.csv who recompute the draws "
                        "from the public seed) an opt-out looks like a device that fails whenever it is sampled")


def also_sent(cfg: RunConfig, central: bool, uploaded: bool, opted_out: bool, erased: bool) -> list[str]:
    """Sentences of what else left the device in this run (`uploaded`: it sent a training update)."""
    if central:
        return [CENTRAL]
    secure = cfg.secure_aggregation != "none"
    out = []
    if uploaded and not secure:
        if cfg.dp != "local" and cfg.update_mode != "padded":
            out.append("each training reply also carried num-rows (the rating rows trained on: this user's rating "
                       "count when it is alone on its device) and loss-sum (its training loss), un-noised")
        if cfg.update_mode == "sparse":
            out.append("each sparse upload's item-index lists the items this user rated (which items, not the "
                       "ratings), un-noised")
        elif cfg.update_mode == "dense" and cfg.dp in ("none", "central"):
            out.append("the nonzero rows of each dense upload are exactly the items this user rated (which items, "
                       "not the ratings)")
        elif cfg.update_mode == "padded":
            out.append("each padded upload's item-index lists the items this user rated among decoy items")
    if uploaded and not secure and cfg.dp != "local":
        out.append(READABLE)
    if uploaded and cfg.dp == "central":
        out.append("under central DP the update reached the server un-noised (the server adds the noise to the "
                   "sum): the epsilon holds against readers of the run, not against the server")
    until = " until it was erased" if erased else " until its opt-out" if opted_out else ""
    metric = "hits and ranking sums" if cfg.implicit else "squared and absolute errors"
    out.append(f"each evaluation round (every {cfg.eval_every} rounds){until}, sums over this user's held-out "
               f"ratings ({metric} and their count, added to those of any other users on its device), un-noised")
    if opted_out:
        out.append(LOOKS_LIKE_A_FAILURE)
    return out
