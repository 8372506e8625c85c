"""The benchmark harness ships inside the package as :mod:`npdgm.bench` (``npdgm bench``); this folder keeps
``python -m benchmarks.run`` / ``benchmarks.profile`` working in a checkout, and README.md holds the results."""
