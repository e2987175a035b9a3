"""Downstream evaluation: metrics and statistics, labels, embeddings, probes, sweeps, reports."""
