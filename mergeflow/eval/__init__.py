"""Evaluation harness: tasks from offline sources, log-likelihood scoring, paper metrics."""
