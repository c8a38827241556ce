"""Analysis stage: forgetting metrics, accuracy-versus-alpha curves, Pareto fronts, reports, ablations."""
