"""Reporting: the run's metrics log (:mod:`~grpo.reporting.metrics_log`), its charts
(:mod:`~grpo.reporting.charts`), markdown (:mod:`~grpo.reporting.markdown`) and the end-of-run report
(:mod:`~grpo.reporting.run_report`)."""

from grpo.reporting.charts import PLOTS_DIR, bar_chart, plot_metrics
from grpo.reporting.metrics_log import METRICS_FILE, MetricsLogger, read_metrics
from grpo.reporting.run_report import (
    ON_STAGE2_PROMPTS,
    SAMPLED,
    PhaseEval,
    compute_deltas,
    ran_settings,
    recipe_settings,
    write_report,
)

__all__ = ["METRICS_FILE", "ON_STAGE2_PROMPTS", "PLOTS_DIR", "SAMPLED", "MetricsLogger", "PhaseEval", "bar_chart",
           "compute_deltas", "plot_metrics", "ran_settings", "read_metrics", "recipe_settings", "write_report"]
