"""Thin job entry points: `python -m ray_jobs.<job>`, locally or under `ray job submit`.

The `synpref` CLI (`ray_jobs.cli`) dispatches to the same commands.
"""
