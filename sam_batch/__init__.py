"""sam-batch: Segment Anything automatic mask generation over image archives, into Parquet."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sam-batch")  # written once, in pyproject.toml
except PackageNotFoundError:  # sources copied, not installed (deploy/gpu-check.sh's site)
    __version__ = "0+unknown"
