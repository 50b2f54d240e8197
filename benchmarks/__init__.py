"""Benchmarks of orcal: speed of each op against its reference and its peers."""
