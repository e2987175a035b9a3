"""Downstream evaluation: metrics and statistics, labels, attention distance, reports and figures.

Nothing here imports `fmct_ray.data` (tests/test_layout.py): the evaluation views and embeddings
are data-path work (`fmct_ray.data.views`, `fmct_ray.data.embed`), the runs are `fmct_ray.downstream`."""
