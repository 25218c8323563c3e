"""Reward models: the model and chat formatting, losses, training data, training, scoring, serving,
evaluation, registry.
"""
