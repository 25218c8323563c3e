"""The human-AI synergy loop: Stage 1 grows the gold and silver sets with humans and LLM judges
guided by a reward model, Stage 2 filters the rest with two reward models, and the curated set
trains the final one. Every step commits to ``loop_state``, so a loop resumes where it stopped.
"""
