"""``python -m benchmarks.profile`` in a checkout: the same as ``python -m npdgm.bench.profile``."""
import sys

from npdgm.bench import profile as _profile

if __name__ == "__main__":
    sys.exit(_profile.main())
sys.modules[__name__] = _profile
