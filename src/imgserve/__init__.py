"""imgserve: an image-processing daemon (JSON jobs over HTTP, libvips)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("imgserve")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0+unknown"
