"""Merging stage: checkpoint sources, merge methods, rules, planning, execution and writing."""
