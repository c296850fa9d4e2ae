"""Flower ServerApp: composes the configuration, runs and evaluates rounds, writes the results."""
