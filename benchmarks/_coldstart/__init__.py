"""Helpers of ``benchmarks/coldstart.py``: the apps it serves and its open-loop load generator.

A package rather than ``benchmarks/_*.py`` files: CI runs every ``benchmarks/*.py`` with ``--quick``.
"""
