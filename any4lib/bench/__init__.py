"""Benchmarks, each run as `python -m any4lib.bench.<name>`: lut (LUT learning), kernels (tinygemm), e2e (decode)."""
