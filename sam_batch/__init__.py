"""sam-batch: Segment Anything automatic mask generation over image archives, into Parquet."""

__version__ = "0.1.0"
