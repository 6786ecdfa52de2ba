"""The audit service: judges sampled decisions, estimates acceptance, moves thresholds to hold targets."""
