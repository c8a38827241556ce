"""The embedded default: a synthetic microscopy benchmark in μ-Bench's schema, and caption corpora."""
