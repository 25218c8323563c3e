"""Data hygiene: exact and near-duplicate pairs, prompt groups, label conflicts, benchmark
decontamination.
"""
