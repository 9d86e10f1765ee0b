"""The FA4 version floor (Note [FA4 version floor] in compiled_mask/_fa4.py), on any machine:
the installed release is faked through importlib.metadata, so no FA4 is needed."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest

from compiled_mask import Eagle3Attention, _fa4

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def fa4_release(fa4_installed, monkeypatch):
    """Set the flash-attn-4 version that importlib.metadata reports (None: no metadata)."""

    def install(version: str | None) -> None:
        real = importlib.metadata.version

        def version_of(name: str) -> str:
            if name != "flash-attn-4":
                return real(name)
            if version is None:
                raise importlib.metadata.PackageNotFoundError(name)
            return version

        monkeypatch.setattr(importlib.metadata, "version", version_of)

    return install


# 4.0.0b9 sorts after 4.0.0b36 as a string: the check must compare versions, not text.
@pytest.mark.parametrize("version", ["4.0.0b35", "4.0.0b25", "4.0.0b9", "4.0.0a40", "4.0.0b36.dev0", "3.9"])
def test_too_old_fa4_is_refused_with_the_version_to_install(fa4_release, version):
    fa4_release(version)
    with pytest.raises(ImportError, match=rf"needs flash-attn-4 >= 4\.0\.0b36, but {re.escape(version)} is "
                                          r"installed.*pip install -U 'flash-attn-4>=4\.0\.0b36'"):
        Eagle3Attention(128, 4, backend="fa4")


@pytest.mark.parametrize("version", ["4.0.0b36", "4.0.0b36.post1", "4.0.0b40", "4.0.0rc1", "4.0.0", "4.1.0.dev1"])
def test_new_enough_fa4_is_accepted(fa4_release, version):
    fa4_release(version)
    assert Eagle3Attention(128, 4, backend="fa4").backend == "fa4"


def test_fa4_without_metadata_is_not_refused(fa4_release):
    """A flash_attn source tree on sys.path has no version to check: it is let through."""
    fa4_release(None)
    assert Eagle3Attention(128, 4, backend="fa4").backend == "fa4"


def test_the_extra_has_the_same_floor():
    """pyproject's fa4 extra must not resolve to a release the backend refuses."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert f"flash-attn-4>={_fa4._FA4_MIN_VERSION}" in extras["fa4"]
    assert "nvidia-cutlass-dsl>=4.8.1" in extras["fa4"]
