"""Dataset layouts, the Parquet manifest, the shared image transform and the demo-data generator.

Import the submodules themselves: this package file stays empty so that manifest-only commands
(prepare, validate, `plantad metrics`) do not pay for importing torch and timm.
"""
