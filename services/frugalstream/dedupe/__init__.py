"""Dedupe: exact match, verified semantic match, in-flight coalescing."""
