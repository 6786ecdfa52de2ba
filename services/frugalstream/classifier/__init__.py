"""Classifier: task type, tier, model, token counts, context budget and budget checks."""
