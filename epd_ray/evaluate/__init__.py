"""Evaluation on a held-out split and the report."""
