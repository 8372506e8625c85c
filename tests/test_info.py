"""`npdgm info`: what a bug report needs — versions of the optional packages and where data is cached."""
from importlib import metadata

import matplotlib
import tqdm

from npdgm import cli


def test_info_lists_the_optional_packages_and_the_data_cache(capsys, monkeypatch, tmp_path):
    real = metadata.version

    def version(name):
        if name in ("matplotlib", "tqdm"):
            return real(name)
        if name == "numba":
            return "9.9"
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", version)
    monkeypatch.setenv("NPDGM_DATA", str(tmp_path))
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"matplotlib {matplotlib.__version__}" in out and f"tqdm {tqdm.__version__}" in out
    assert "numba 9.9" in out
    for name in ("torch", "numexpr", "mpi4py"):
        assert f"{name} not installed" in out
    assert f"data cache: {tmp_path} (NPDGM_DATA set)" in out
