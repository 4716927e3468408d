"""Ablation sweeps: sweep files (spec), local and Ray runners (runner), reports (report)."""
