"""ocrconv: turn PaddleOCR's published models into verified PyTorch weights."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ocrconv")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

# dtypes a converted model's weights can be stored in (``convert --dtype``); torch-free so the CLI can list them
OUTPUT_DTYPES = ("float32", "float16")
