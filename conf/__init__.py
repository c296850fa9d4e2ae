"""Hydra configuration tree (YAML files beside this module); see config.yaml."""
