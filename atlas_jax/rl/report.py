"""The teaching-evaluation report: figures, a Markdown summary and an outcome chart.

An evaluation runs the teacher-student episode greedily (one guidance per problem) and
asks, per problem: did the guidance turn a wrong answer right (improved), keep a right
one right, leave a wrong one wrong, or break a right one (degraded)?
"""

from __future__ import annotations

import json
import pathlib
from typing import Sequence

import numpy as np

from atlas_jax.rl import rewards as rewards_lib
from atlas_jax.rl.rollout import TeachingEpisode

OUTCOMES = ("improved", "kept_right", "kept_wrong", "degraded")


def _answered(texts: Sequence[str]) -> np.ndarray:
    return np.asarray([rewards_lib.extract_answer(t) is not None for t in texts], bool)


def teaching_report(episodes: Sequence[TeachingEpisode]) -> dict:
    """Aggregates greedy episodes (G = 1) into the report's figures."""
    cat = lambda f: np.concatenate([f(e) for e in episodes]) if episodes else np.zeros(0)  # noqa: E731
    scored = cat(lambda e: e.has_answer).astype(bool)
    with_ = cat(lambda e: e.perf_with)[scored]
    base = cat(lambda e: e.perf_baseline)[scored]
    d = with_ - base
    n = int(scored.sum())
    mean = lambda x: float(np.mean(x)) if len(x) else 0.0  # noqa: E731
    len_with = cat(lambda e: e.with_teaching.lengths)
    len_base = cat(lambda e: e.baseline.lengths)
    outcomes = {
        "improved": int(np.sum(d > 0)),
        "kept_right": int(np.sum((d == 0) & (with_ > 0))),
        "kept_wrong": int(np.sum((d == 0) & (with_ == 0))),
        "degraded": int(np.sum(d < 0)),
    }
    return {
        "num_problems": int(len(scored)),
        "num_scored": n,
        "baseline_accuracy": mean(base),
        "accuracy_with_guidance": mean(with_),
        "average_accuracy_improvement": mean(d),
        "improvement_rate": mean(d > 0),
        "degradation_rate": mean(d < 0),
        "non_degradation_rate": mean(d >= 0),
        "task_completion_rate_with_guidance": mean(cat(lambda e: _answered(e.with_teaching.texts))),
        "task_completion_rate_baseline": mean(cat(lambda e: _answered(e.baseline.texts))),
        "mean_guidance_tokens": mean(cat(lambda e: e.teaching_length)),
        "student_tokens_with_guidance": mean(len_with),
        "student_tokens_baseline": mean(len_base),
        "student_token_reduction": 1.0 - mean(len_with) / mean(len_base) if mean(len_base) else 0.0,
        "outcomes": outcomes,
    }


def render_markdown(report: dict, title: str) -> str:
    pct = lambda k: f"{100 * report[k]:.1f}%"  # noqa: E731
    rows = [
        f"# {title}",
        "",
        f"{report['num_scored']} problems scored (of {report['num_problems']}), greedy decoding.",
        "",
        "| figure | value |",
        "| --- | --- |",
        f"| baseline accuracy | {pct('baseline_accuracy')} |",
        f"| accuracy with guidance | {pct('accuracy_with_guidance')} |",
        f"| average accuracy improvement | {100 * report['average_accuracy_improvement']:+.1f} points |",
        f"| improvement / degradation rate | {pct('improvement_rate')} / {pct('degradation_rate')} |",
        f"| non-degradation rate | {pct('non_degradation_rate')} |",
        f"| answer given, with / without guidance | {pct('task_completion_rate_with_guidance')} / "
        f"{pct('task_completion_rate_baseline')} |",
        f"| mean guidance tokens | {report['mean_guidance_tokens']:.1f} |",
        f"| student tokens, with / without guidance | {report['student_tokens_with_guidance']:.1f} / "
        f"{report['student_tokens_baseline']:.1f} ({100 * report['student_token_reduction']:+.1f}% fewer) |",
        "",
        "Outcomes: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in report["outcomes"].items()),
        "",
        "![outcomes](outcomes.png)",
    ]
    return "\n".join(rows) + "\n"


def plot_outcomes(report: dict, path: pathlib.Path, title: str) -> None:
    """A horizontal bar of the four outcomes, greens for good, red for harm."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    counts = [report["outcomes"][k] for k in OUTCOMES]
    colors = ["#2e7d32", "#81c784", "#bdbdbd", "#c62828"]
    fig, ax = plt.subplots(figsize=(7, 2.6), dpi=120)
    ax.barh([k.replace("_", " ") for k in OUTCOMES][::-1], counts[::-1], color=colors[::-1])
    for y, c in enumerate(counts[::-1]):
        ax.text(c, y, f" {c}", va="center")
    ax.set_xlabel("problems")
    ax.set_title(f"{title}: baseline {100 * report['baseline_accuracy']:.0f}% -> with guidance "
                 f"{100 * report['accuracy_with_guidance']:.0f}%", fontsize=10)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(report: dict, directory: pathlib.Path, title: str = "Teaching evaluation") -> dict[str, str]:
    """Writes report.json, report.md and outcomes.png; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"json": directory / "report.json", "markdown": directory / "report.md",
             "chart": directory / "outcomes.png"}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["markdown"].write_text(render_markdown(report, title))
    plot_outcomes(report, paths["chart"], title)
    return {k: str(v) for k, v in paths.items()}


def reward_curve(metrics_jsonl: pathlib.Path) -> list[tuple[int, float]]:
    """(step, mean reward) of every training row of a run's metrics.jsonl."""
    if not metrics_jsonl.is_file():
        return []
    rows = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    curve = {int(r["step"]): float(r["reward"]) for r in rows if isinstance(r.get("reward"), (int, float))}
    return sorted(curve.items())


def render_comparison(reports: dict) -> str:
    """Side-by-side Markdown of the SFT and RCL teachers' reports (same student, same problems)."""
    sft_r, rcl_r = reports["sft_teacher"], reports["rcl_teacher"]
    pct = lambda r, k: f"{100 * r[k]:.1f}%"  # noqa: E731
    rows = [
        "# Teaching effect: SFT teacher vs RCL teacher",
        "",
        f"The same frozen student on the same {rcl_r['num_scored']} held-out problems, greedy decoding.",
        "",
        "| figure | no teacher | SFT teacher | RCL teacher |",
        "| --- | --- | --- | --- |",
        f"| student accuracy | {pct(sft_r, 'baseline_accuracy')} | {pct(sft_r, 'accuracy_with_guidance')} | "
        f"{pct(rcl_r, 'accuracy_with_guidance')} |",
    ]
    for label, key in (("improvement rate", "improvement_rate"), ("degradation rate", "degradation_rate"),
                       ("non-degradation rate", "non_degradation_rate")):
        rows.append(f"| {label} | | {pct(sft_r, key)} | {pct(rcl_r, key)} |")
    rows.append(f"| mean guidance tokens | | {sft_r['mean_guidance_tokens']:.1f} | "
                f"{rcl_r['mean_guidance_tokens']:.1f} |")
    for outcome in OUTCOMES:
        rows.append(f"| {outcome.replace('_', ' ')} | | {sft_r['outcomes'][outcome]} | "
                    f"{rcl_r['outcomes'][outcome]} |")
    return "\n".join([*rows, "", "![comparison](comparison.png)"]) + "\n"


def plot_comparison(reports: dict, curve: list[tuple[int, float]], path: pathlib.Path) -> None:
    """Left: accuracy alone / with each teacher, with each teacher's outcome shares stacked;
    right: the RCL reward curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sft_r, rcl_r = reports["sft_teacher"], reports["rcl_teacher"]
    fig, (ax, ax_r) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=120, gridspec_kw={"width_ratios": [1.3, 1]})
    labels = ["no teacher", "SFT teacher", "RCL teacher"]
    accuracy = [sft_r["baseline_accuracy"], sft_r["accuracy_with_guidance"], rcl_r["accuracy_with_guidance"]]
    ax.bar(labels, accuracy, color=["#9e9e9e", "#64b5f6", "#1565c0"], width=0.5)
    for x, a in enumerate(accuracy):
        ax.text(x, a + 0.02, f"{100 * a:.0f}%", ha="center")
    colors = dict(zip(OUTCOMES, ["#2e7d32", "#81c784", "#bdbdbd", "#c62828"]))
    for x, report in ((1.33, sft_r), (2.33, rcl_r)):  # outcome shares beside each teacher's bar
        n, bottom = max(sum(report["outcomes"].values()), 1), 0.0
        for outcome in OUTCOMES:
            share = report["outcomes"][outcome] / n
            ax.bar(x, share, bottom=bottom, width=0.12, color=colors[outcome],
                   label=outcome.replace("_", " ") if x < 2 else None)
            bottom += share
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("share of problems")
    ax.set_title("student accuracy (bars) and outcomes (stacked)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", frameon=False)
    if curve:
        steps, rewards = zip(*curve)
        ax_r.plot(steps, rewards, color="#1565c0", lw=1, alpha=0.5)
        window = max(len(rewards) // 6, 1)
        smooth = np.convolve(rewards, np.ones(window) / window, mode="valid")
        ax_r.plot(steps[window - 1:], smooth, color="#1565c0", lw=2, label=f"mean of {window} steps")
        ax_r.legend(fontsize=7, frameon=False)
    ax_r.set_xlabel("RCL step")
    ax_r.set_ylabel("mean reward")
    ax_r.set_title("RCL reward", fontsize=10)
    for a in (ax, ax_r):
        a.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_comparison(reports: dict, directory: pathlib.Path, rewards_from: pathlib.Path) -> dict[str, str]:
    """comparison.json ({"sft_teacher": report, "rcl_teacher": report}), comparison.md and
    comparison.png in `directory`; returns their paths."""
    paths = {"json": directory / "comparison.json", "markdown": directory / "comparison.md",
             "chart": directory / "comparison.png"}
    paths["json"].write_text(json.dumps(reports, indent=2) + "\n")
    paths["markdown"].write_text(render_comparison(reports))
    plot_comparison(reports, reward_curve(rewards_from), paths["chart"])
    return {k: str(v) for k, v in paths.items()}
