"""The package version, in a module of its own: any module can import it without importing the
package root (which imports most modules, so importing the root from them would be a cycle)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("svdcompress")
except PackageNotFoundError:  # a source tree that was never installed (pip install -e .)
    __version__ = "0+unknown"
