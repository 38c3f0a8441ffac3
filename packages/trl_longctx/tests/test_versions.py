import pytest
from packaging.specifiers import SpecifierSet

from trl_longctx._versions import check_versions


def test_installed_versions_are_supported():
    check_versions()


def test_out_of_range_names_package_and_range():
    with pytest.raises(ImportError, match=r"supports trl>=9.0.*found trl=="):
        check_versions({"trl": SpecifierSet(">=9.0")})
    with pytest.raises(ImportError, match="not installed"):
        check_versions({"surely-not-a-package-xyz": SpecifierSet(">=1")})
