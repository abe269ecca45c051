"""Benchmarks: each measures the things it compares in one run and reports ratios.

May import anything but commands.
"""
