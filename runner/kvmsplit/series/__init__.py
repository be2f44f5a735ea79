"""`kvmsplit series`: a patch series against its base kernel, end to end
(sources, builds, paired runs, comparison, bisection, reports)."""
