"""ocrconv: turn PaddleOCR's published models into verified PyTorch weights."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ocrconv")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"
