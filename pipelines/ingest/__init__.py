"""Step 0: read preference files of any common layout into the lake's pairs table, quarantining bad
rows.
"""
