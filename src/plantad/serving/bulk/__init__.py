"""Bulk scoring with Ray Data: `run_bulk` scores a folder or S3 prefix into Parquet parts, resumably;
`read_results` reads one model's finished table."""

from plantad.serving.bulk.job import BulkSummary, run_bulk
from plantad.serving.bulk.plan import read_results

__all__ = ["BulkSummary", "read_results", "run_bulk"]
