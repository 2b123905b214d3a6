"""Dataset metadata, validation and image transforms."""
