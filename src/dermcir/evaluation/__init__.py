"""Evaluation: the k-fold benchmark, its result files and reports."""
