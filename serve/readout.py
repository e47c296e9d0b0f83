"""The readout of an experiment: interactions attributed to impressions, figures per arm, tests.

Attribution (last touch): each recorded interaction (user, item, time t) of a counted kind goes
to the user's latest logged impression that showed the item and was made at most
`window_seconds` before t (t may lead the impression by `SLACK_SECONDS`: interaction timestamps
are whole seconds); a click is counted once per (impression, item). Interactions with no such
impression are `unattributed` (not sampled users, items found elsewhere, late clicks).

Per arm: impressions, users, clicks, CTR = share of impressions with at least one click, hit@K
= share of impressions with a click in the top K positions, clicks per impression, users with a
click. Intervals are 95% Wilson score intervals (scipy.stats.binomtest.proportion_ci); each
treatment is compared with the control by a two-proportion test on CTR (Pearson chi-square on
the 2x2 table without continuity correction, scipy.stats.chi2_contingency, the same p as the
two-sided z test) and its relative CTR with a 95% interval (scipy.stats.contingency.
relative_risk). The tests treat impressions as independent; a user who sees many lists makes them
correlated, so with many impressions per user also read the per-user figures (`clicked_users /
users`, tested the same way as `user_p_value`).
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field

from scipy import stats
from scipy.stats.contingency import relative_risk

from index.events import Event, SQLStore
from index.events import impressions as imp_store
from index.events.impressions import Impression
from serve.experiment_config import Attribution, ExperimentConfig

SLACK_SECONDS = 1.0
LEVEL = 0.95


@dataclass
class Attributed:
    """Clicks per impression: {impression id: {position of each clicked item}}."""

    clicks: dict[str, set[int]] = field(default_factory=dict)
    unattributed: int = 0


def attribute(impressions: list[Impression], events: list[Event],
              spec: Attribution) -> Attributed:
    """Match interactions to the impressions that showed their items (last touch, windowed)."""
    by_user: dict[int, list[tuple[float, Impression, dict[int, int]]]] = defaultdict(list)
    for imp in sorted(impressions, key=lambda i: i.created):
        positions = {}
        for pos, item in enumerate(imp.item_ids.tolist()):
            positions.setdefault(item, pos)
        by_user[imp.user_id].append((imp.created, imp, positions))
    out = Attributed()
    for event in events:
        if spec.actions and event.action not in spec.actions:
            continue
        shown = by_user.get(int(event.user_id), [])
        for item, stamp in zip(event.item_ids.tolist(), event.timestamps.tolist()):
            match = None
            for created, imp, positions in shown:
                if created - SLACK_SECONDS > stamp:
                    break
                if item in positions and stamp <= created + spec.window_seconds:
                    match = (imp, positions[item])
            if match is None:
                out.unattributed += 1
            else:
                out.clicks.setdefault(match[0].impression_id, set()).add(match[1])
    return out


def wilson(successes: int, trials: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (nan, nan without trials)."""
    if trials == 0:
        return math.nan, math.nan
    ci = stats.binomtest(successes, trials).proportion_ci(LEVEL, method="wilson")
    return float(ci.low), float(ci.high)


def two_proportion_p(k1: int, n1: int, k0: int, n0: int) -> float:
    """Two-sided p of equal proportions (chi-square on the 2x2 table, no correction)."""
    table = [[k1, n1 - k1], [k0, n0 - k0]]
    if min(n1, n0) == 0 or k1 + k0 == 0 or k1 + k0 == n1 + n0:
        return 1.0
    return float(stats.chi2_contingency(table, correction=False).pvalue)


@dataclass
class ArmFigures:
    """The readout of one arm."""

    arm: str
    bundle: str
    impressions: int
    users: int
    clicks: int
    clicked_impressions: int
    clicked_users: int
    ctr: float
    ctr_ci: tuple[float, float]
    clicks_per_impression: float
    hit_at: dict[int, float]
    hit_ci: dict[int, tuple[float, float]]
    user_rate: float
    vs_control: dict = field(default_factory=dict)


def arm_figures(arm, rows: list[Impression], found: Attributed, ks: tuple[int, ...]) -> ArmFigures:
    """Counts, rates and intervals of one arm's impressions."""
    n = len(rows)
    clicked = [found.clicks.get(r.impression_id, set()) for r in rows]
    k = sum(1 for c in clicked if c)
    users = {r.user_id for r in rows}
    clicked_users = {r.user_id for r, c in zip(rows, clicked) if c}
    hits = {K: sum(1 for c in clicked if c and min(c) < K) for K in ks}
    rate = (lambda x: x / n if n else math.nan)
    return ArmFigures(
        arm.name, arm.bundle, n, len(users), sum(len(c) for c in clicked), k,
        len(clicked_users), rate(k), wilson(k, n), rate(sum(len(c) for c in clicked)),
        {K: rate(h) for K, h in hits.items()}, {K: wilson(h, n) for K, h in hits.items()},
        len(clicked_users) / len(users) if users else math.nan)


def compare(arm: ArmFigures, control: ArmFigures) -> dict:
    """Treatment vs control: CTR difference, relative CTR with its interval, p-values."""
    out = {"ctr_diff": arm.ctr - control.ctr,
           "p_value": two_proportion_p(arm.clicked_impressions, arm.impressions,
                                       control.clicked_impressions, control.impressions),
           "user_p_value": two_proportion_p(arm.clicked_users, arm.users,
                                            control.clicked_users, control.users)}
    if arm.clicked_impressions and control.clicked_impressions:
        rr = relative_risk(arm.clicked_impressions, arm.impressions,
                           control.clicked_impressions, control.impressions)
        ci = rr.confidence_interval(LEVEL)
        out.update(relative_ctr=float(rr.relative_risk), relative_ctr_ci=(float(ci.low),
                                                                          float(ci.high)))
    return out


def figures(cfg: ExperimentConfig, impressions: list[Impression], events: list[Event]) -> dict:
    """The whole readout of an experiment from its impressions and interactions."""
    found = attribute(impressions, events, cfg.attribution)
    by_arm: dict[str, list[Impression]] = defaultdict(list)
    for imp in impressions:
        by_arm[imp.arm].append(imp)
    arms = [arm_figures(a, by_arm.get(a.name, []), found, cfg.attribution.ks) for a in cfg.arms]
    for arm in arms[1:]:
        arm.vs_control = compare(arm, arms[0])
    winner = None
    significant = [a for a in arms[1:] if a.vs_control.get("p_value", 1.0) < 1 - LEVEL]
    if significant:
        best = max(arms, key=lambda a: a.ctr if not math.isnan(a.ctr) else -1)
        winner = best.arm if best is arms[0] or best in significant else None
    return {"experiment": cfg.name, "control": cfg.control.name,
            "window_seconds": cfg.attribution.window_seconds,
            "unattributed_interactions": found.unattributed,
            "arms": [asdict(a) for a in arms], "winner": winner}


def readout(store: SQLStore, cfg: ExperimentConfig) -> dict:
    """Read an experiment's impressions and the interactions after them, and sum them up."""
    shown = imp_store.read(store, cfg.name)
    first = min((i.created for i in shown), default=None)
    events = [] if first is None else imp_store.interactions_since(store, first - SLACK_SECONDS)
    return figures(cfg, shown, events)


def table(result: dict) -> str:
    """The readout as a Markdown table plus a verdict line."""
    ks = sorted({int(k) for a in result["arms"] for k in a["hit_at"]})
    head = ["arm", "bundle", "impressions", "users", "clicks", "CTR [95% CI]"] + [
        f"hit@{k}" for k in ks] + ["relative CTR [95% CI]", "p"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in result["arms"]:
        vs = a["vs_control"]
        rel = (f"{vs['relative_ctr']:.3f} [{vs['relative_ctr_ci'][0]:.3f}, "
               f"{vs['relative_ctr_ci'][1]:.3f}]" if "relative_ctr" in vs else "-")
        row = [a["arm"], a["bundle"], str(a["impressions"]), str(a["users"]), str(a["clicks"]),
               f"{a['ctr']:.4f} [{a['ctr_ci'][0]:.4f}, {a['ctr_ci'][1]:.4f}]"] + [
            f"{a['hit_at'][k]:.4f}" for k in ks] + [
            rel, f"{vs['p_value']:.3g}" if "p_value" in vs else "control"]
        lines.append("| " + " | ".join(row) + " |")
    verdict = (f"winner: {result['winner']} (p < {1 - LEVEL:.2f})" if result["winner"]
               else "no significant difference yet")
    lines.append(f"\n{verdict}; {result['unattributed_interactions']} interactions not "
                 f"attributed to a logged impression")
    return "\n".join(lines)
