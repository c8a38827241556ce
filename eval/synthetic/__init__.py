"""The embedded default: a synthetic microscopy benchmark in μ-Bench's schema, and caption corpora."""

# every row's `institution`: how `data verify` tells this benchmark from a damaged copy of μ-Bench
SYNTHETIC_INSTITUTION = "micromerge synthetic"
