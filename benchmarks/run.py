"""``python -m benchmarks.run`` in a checkout: the same command as ``npdgm bench`` (code: npdgm/bench/run.py)."""
import sys

from npdgm.bench import run as _run

if __name__ == "__main__":
    sys.exit(_run.main(prog="python -m benchmarks.run"))
sys.modules[__name__] = _run  # `import benchmarks.run` is npdgm.bench.run itself
