"""A readable pre/post table of a run summary."""

from __future__ import annotations

from .metrics import HEADLINE

ORDER = ["efficacy", "generalization", "specificity", "locality", "score", "efficacy_magnitude",
         "generalization_magnitude", "specificity_magnitude", "efficacy_acc", "generalization_acc",
         "specificity_acc", "perplexity", "fluency"]


def table(summary: dict) -> str:
    pre, post = summary.get("pre", {}), summary.get("post", {})
    keys = [k for k in ORDER if k in pre or k in post] + sorted((set(pre) | set(post)) - set(ORDER))
    width = max(len(k) for k in keys) if keys else 10
    head = (f"{summary.get('method')} on {summary.get('model')} | {summary.get('bench')} | mode {summary.get('mode')}"
            f" | {summary.get('n_cases')} cases")
    lines = [head, f"{'metric':<{width}}  {'pre':>9}  {'post':>9}  {'change':>9}"]
    for k in keys:
        a, b = pre.get(k), post.get(k)
        fa = f"{a:9.2f}" if isinstance(a, (int, float)) else f"{'-':>9}"
        fb = f"{b:9.2f}" if isinstance(b, (int, float)) else f"{'-':>9}"
        d = f"{b - a:+9.2f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) else f"{'':>9}"
        lines.append(f"{k:<{width}}  {fa}  {fb}  {d}")
    ar = summary.get("after_round")
    if ar:
        main = [k for k in HEADLINE if k in ar and k in post]
        lines.append("right after each round: " + ", ".join(f"{k} {ar[k]:.2f}" for k in main)
                     + " | at the end: " + ", ".join(f"{k} {post[k]:.2f}" for k in main))
    t = summary.get("timing", {})
    if t:
        lines.append(f"edit {t.get('edit_s', 0):.1f} s ({t.get('edit_s_per_fact', 0):.3f} s/fact), "
                     f"eval {t.get('eval_s', 0):.1f} s")
    return "\n".join(lines)
