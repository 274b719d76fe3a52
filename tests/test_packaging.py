"""The package's metadata reads cleanly: ``pip install`` printed setuptools'
"``project.license`` as a TOML table is deprecated" warning three times (issue 10,
defect 7). The check runs the same setuptools code that an install runs on
pyproject.toml, in this process, and fails on any deprecation it warns about."""

from __future__ import annotations

import tomllib
import warnings

from tests.support.daemon import ROOT


def test_pyproject_metadata_has_no_deprecated_form():
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), ROOT / "pyproject.toml")
    deprecations = [str(w.message).splitlines()[0] for w in caught if "Deprecat" in w.category.__name__]
    assert deprecations == []
    assert dist.metadata.license_expression == "Apache-2.0"


def test_the_build_asks_for_a_setuptools_that_reads_an_spdx_license():
    with open(ROOT / "pyproject.toml", "rb") as f:
        data = tomllib.load(f)
    assert isinstance(data["project"]["license"], str)
    assert "setuptools>=77" in data["build-system"]["requires"][0]
