"""Track Deepvue bulk-verification batches until their output files are safely on disk."""

__version__ = "0.1.0"
