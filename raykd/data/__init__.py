"""Data layer: one sharded-Parquet format for every source (see :mod:`raykd.data.schema`)."""
