"""Runs and their results, whatever produced them: the results model and its
schema, the run loop every backend shares, result sinks, the history
database with its migrations, comparison of two runs, and the names every
report uses (digest)."""
