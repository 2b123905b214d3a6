"""The run: what wraps the training core for one run directory (resume, logging sinks, health, profiler)."""
