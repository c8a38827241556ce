"""micromerge: fine-tune, merge and evaluate CLIP-style models on microscopy.

This package holds the plumbing every stage shares (errors, hashing, atomic writes,
manifests, config loading, device choice) plus the CLI and the demo that wire the
stages (`merging`, `finetune`, `eval`, `analysis`) together.
"""

__version__ = "0.1.18"
