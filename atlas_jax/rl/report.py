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
