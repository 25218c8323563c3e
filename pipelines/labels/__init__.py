"""Labels with lineage: label events and the labels derived from them, named curated sets, and
human review in Label Studio.
"""
