"""The ground every stage stands on: errors, atomic writes, hashing, provenance, config files,
devices and progress bars. It imports no stage (tests/test_layers.py)."""
