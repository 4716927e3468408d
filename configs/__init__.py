"""Experiment configs: each file defines get_config(arg) -> ConfigDict (see base.py for fields)."""
