"""Summarizer: batch summarization backfills that pay once per distinct item."""
