"""Generation: sampling rules, the reference (full-recompute) generator, loading workdirs."""
