"""What is shown: results/<grid>/ aggregated over seeds, each claim's effect with a 95% interval and a verdict,
seaborn figures, and REPORT.md. `render_report(results_dir, out_dir)` does it all; `ablate report` calls it."""
from reports.render import build_report, render_report, write_report

__all__ = ["build_report", "render_report", "write_report"]
