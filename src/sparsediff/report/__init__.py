"""Reports built from run directories: ``sparsediff report DIR [DIR ...] [--out DIR]``.

Reads nothing but run directories (their config, summary, evaluation and metrics files) and writes
``report.md`` (the paper-style table: FID mean ± std over seeds next to dense, non-zero parameters,
inference and training FLOPs as ratios to dense, wall-clock, bytes on disk of the checkpoint and of the
sparse export), ``results.csv`` (every number of every run) and PNG plots (FID vs sparsity, FID vs training FLOPs, sample grids side by side).

- :mod:`.records`: reading run directories into :class:`RunRecord` s, grouping them into table rows;
- :mod:`.plots`: the PNG plots;
- :mod:`.tables`: ``report.md``, ``results.csv`` and :func:`report`, which writes them all.

The FID is shown under the metric name the evaluation gives it (``fid_inception_v3``,
``fid_sparsediff_fmnist`` ...): a FID in sparsediff's own feature space is never presented as Inception FID.
"""

from .plots import plot_fid_vs_sparsity, plot_fid_vs_train_flops, plot_sample_grids
from .records import Group, RunRecord, find_runs, group_runs, load_run, mean_std, read_metrics
from .tables import report, write_csv

__all__ = [
    "Group",
    "RunRecord",
    "find_runs",
    "group_runs",
    "load_run",
    "mean_std",
    "plot_fid_vs_sparsity",
    "plot_fid_vs_train_flops",
    "plot_sample_grids",
    "read_metrics",
    "report",
    "write_csv",
]
