"""LLM-as-judge: templates, cache identity, verdict parsing, the judging actor, verdicts and judge
quality.
"""
