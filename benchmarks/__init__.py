"""Benchmarks: one script per question, each printing ``name: ours X s, reference Y s, ratio Z``."""
