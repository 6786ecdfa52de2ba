"""`frugalstream bench ...`: workloads that print a table for people and write JSON."""
