"""The PyTorch peers of the benchmark workloads now live in :mod:`npdgm.bench.torch_models` (this name is kept
for code that imported them from a checkout)."""
import sys

from npdgm.bench import torch_models as _torch_models

sys.modules[__name__] = _torch_models
