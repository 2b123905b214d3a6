"""Tools beside the trainer: evaluation, prediction, export, reports, benchmarks, the GPU check."""
