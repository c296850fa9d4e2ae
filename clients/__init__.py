"""Flower ClientApp for one camera site: turns server messages into calls on ``reid``."""
