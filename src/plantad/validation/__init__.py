"""Great Expectations suite over the dataset manifest (the DVC `validate` stage)."""

from plantad.validation.report import DataValidationError, Failure, ValidationReport
from plantad.validation.suite import validate_manifest

__all__ = ["DataValidationError", "Failure", "ValidationReport", "validate_manifest"]
