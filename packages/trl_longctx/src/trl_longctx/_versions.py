"""Supported versions of the libraries `trl_longctx` subclasses, checked at import."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from packaging.specifiers import SpecifierSet
from packaging.version import Version

# TRL's hook names and signatures (`_get_per_token_logps_and_entropies`) move between minor releases.
SUPPORTED = {
    "trl": SpecifierSet(">=1.16,<1.17"),
    "transformers": SpecifierSet(">=5.17,<5.18"),
    "torch": SpecifierSet(">=2.11"),
}


def check_versions(supported: dict[str, SpecifierSet] = SUPPORTED) -> None:
    """Raise `ImportError` naming the package, its installed version and the supported range when out of range."""
    for package, spec in supported.items():
        try:
            installed = version(package)
        except PackageNotFoundError as error:
            raise ImportError(f"trl_longctx needs {package}{spec}, which is not installed.") from error
        # Local build tags (e.g. '2.13.0+cpu') don't change API compatibility.
        if Version(Version(installed).base_version) not in spec:
            raise ImportError(f"trl_longctx supports {package}{spec}; found {package}=={installed}.")
