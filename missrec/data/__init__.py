"""Datasets: the atomic format (reading, writing, splits), batching, `missrec prepare` and SYNTHETIC data."""
