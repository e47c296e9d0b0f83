"""`python -m train.report RUN [--out PATH]`: one self-contained HTML page of a finished run.

The page shows the run's kind and configs (YAML as written), the valid/test table at the best
validation epoch, the cold-start table (heads vs random vs content kNN) when the run measured one,
what stage 2 or distillation added (method, trainable share, start figures, teacher), and the
figures of RUN/plots (training curves; t-SNE + KDE after stage 2, from `python -m train.plots`)
embedded as data URIs, so the file can be mailed or archived alone. Reads only the run directory.
"""
from __future__ import annotations

import argparse
import base64
import sys
from pathlib import Path

from jinja2 import Environment, select_autoescape
from markupsafe import Markup

from index.atomic import write_text
from train.run import (CONFIG, CURVES, DISTILL, PLOTS, REPORT, STAGE1_CONFIG, STAGE2, TSNE,
                       RunMetrics, read_metrics)

KEYS = ("recall@10", "recall@20", "recall@50", "ndcg@10", "ndcg@20", "ndcg@50")
STAGE2_FIELDS = ("method", "tuning_loss", "groups", "trainable_encoder_params", "encoder_params",
                 "trainable_share", "from_stage1")

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 70rem; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
pre { background: #f6f6f6; padding: 0.8rem; overflow-x: auto; }
img { max-width: 100%; border: 1px solid #ddd; }
</style></head><body>
<h1>{{ title }}</h1>
<p>{{ kind }} run in <code>{{ run }}</code>: best validation epoch {{ m.best_epoch }} of
{{ m.epochs_run }}.</p>
<h2>Metrics at the best validation epoch</h2>
{{ table(rows, keys) }}
{% if cold %}<h2>Cold-start items</h2>{{ table(cold, keys) }}{% endif %}
{% if extra %}<h2>{{ extra_title }}</h2><table>
{% for k, v in extra %}<tr><td>{{ k }}</td><td>{{ v }}</td></tr>{% endfor %}</table>{% endif %}
{% for caption, uri in figures %}<h2>{{ caption }}</h2><img alt="{{ caption }}" src="{{ uri }}">
{% endfor %}
{% for name, text in configs %}<h2>{{ name }}</h2><pre>{{ text }}</pre>{% endfor %}
</body></html>
"""

TABLE = """<table><tr><th></th>{% for k in keys %}<th>{{ k }}</th>{% endfor %}</tr>
{% for name, values in rows %}<tr><td>{{ name }}</td>{% for k in keys %}
<td>{{ "%.4f"|format(values[k]) if k in values else "" }}</td>{% endfor %}</tr>{% endfor %}
</table>"""


def _kind(run: Path) -> str:
    """stage 1, stage 2 or distillation, from the run's files."""
    if (run / STAGE2).is_file():
        return "stage-2"
    return "distillation" if (run / DISTILL).is_file() else "stage-1"


def _figures(run: Path) -> list[tuple[str, str]]:
    """(caption, data URI) of the run's plots that exist."""
    out = []
    for name, caption in ((CURVES, "Training curves"),
                          (TSNE, "Item features before and after stage 2 (t-SNE + KDE)")):
        path = run / PLOTS / name
        if path.is_file():
            out.append((caption, "data:image/png;base64,"
                        + base64.b64encode(path.read_bytes()).decode()))
    return out


def _extra(kind: str, m: RunMetrics) -> tuple[str, list[tuple[str, object]]]:
    """What stage 2 or distillation recorded besides the figures."""
    extra = m.model_dump()
    if kind == "stage-2":
        rows = [(k, extra[k]) for k in STAGE2_FIELDS if k in extra]
        if extra.get("start_valid"):
            rows.append(("valid recall@20 of the loaded start",
                         round(extra["start_valid"].get("recall@20", float("nan")), 4)))
        return "Stage 2", rows
    if kind == "distillation":
        info = extra.get("distill", {})
        return "Distillation", [(k, info[k]) for k in ("teacher", "teacher_backbone",
                                                       "teacher_dim", "student_dim") if k in info]
    return "", []


def render(run: Path) -> str:
    """The report page of a finished run."""
    m = read_metrics(run)
    kind = _kind(run)
    env = Environment(autoescape=select_autoescape(default=True))
    table = env.from_string(TABLE)
    keys = [k for k in KEYS if k in m.test]
    cold = [(name, values) for name, values in (m.model_dump().get("cold_start") or {}).items()]
    extra_title, extra = _extra(kind, m)
    configs = [(name, (run / name).read_text(encoding="utf-8"))
               for name in (CONFIG, STAGE2, STAGE1_CONFIG, DISTILL) if (run / name).is_file()]
    return env.from_string(PAGE).render(
        title=f"Run report: {run.name}", kind=kind, run=str(run), m=m, keys=keys,
        rows=[("valid", m.valid), ("test", m.test)], cold=cold, extra=extra,
        extra_title=extra_title, figures=_figures(run), configs=configs,
        table=lambda rows, keys: Markup(table.render(rows=rows, keys=keys)))


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; exit code 2 when RUN is not a finished run."""
    p = argparse.ArgumentParser(prog="python -m train.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="finished run directory")
    p.add_argument("--out", type=Path, help=f"HTML path (default RUN/{REPORT})")
    args = p.parse_args(argv)
    try:
        page = render(args.run)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = args.out or args.run / REPORT
    write_text(out, page)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
