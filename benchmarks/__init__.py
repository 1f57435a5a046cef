"""Benchmarks of implicitdiff against jaxopt, optimistix and exact formulas.

Run `python -m benchmarks [suite ...] [--quick]`; see benchmarks/README.md.
"""
