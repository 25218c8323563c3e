"""Pair attributes (task category, difficulty, guideline) annotated by an LLM."""
