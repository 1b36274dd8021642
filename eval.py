"""Evaluate a checkpoint on verification sets (completed in the evaluation issue)."""
