"""`frugalstream bench ...`: workloads that print a table and write JSON."""
