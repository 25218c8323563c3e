"""LLM and embedding backends shared by judging, attributes and prompt grouping."""
