"""SLIMP's benchmarks: scripts (`python bench/speed.py`, `bench/data.py`, `bench/quality.py`) and the modules
they share (`bench._common`, `bench.quality_report`, `bench.anchors`, `bench.data_converter`), importable as
`bench.*` once the project is installed (`pip install -e .`)."""
