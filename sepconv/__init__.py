"""The model contract shared by the build (``model/``) and the server (``service/``).

``spec`` is what an exported model says about itself (ONNX metadata), ``preprocess`` the one
image-to-tensor implementation both sides run, ``cost`` the graph-derived cost analysis. Nothing
here imports torch or a web framework: the serving image ships this package, not the build.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sepconv-serve")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
