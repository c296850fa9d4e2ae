"""Aggregation on arrays: Flower Message-API strategies, their weighting math, reply checks.

Knows nothing of images or datasets.
"""
