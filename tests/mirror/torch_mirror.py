"""The PyTorch mirror of every npdgm model lives in :mod:`npdgm.bench.torch_models` (one PyTorch version of each
model, shared with the benchmark peers); this name is kept for examples/port_to_torch.py and older links."""
import sys

from npdgm.bench import torch_models as _torch_models

sys.modules[__name__] = _torch_models
