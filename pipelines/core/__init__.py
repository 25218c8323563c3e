"""What every step shares: configuration, the Delta lake, MLflow tracking, the Ray connection, text
and SQL helpers.
"""
