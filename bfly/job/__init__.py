"""The job: the command line, exit contract, signals, watchdog, retry and attempts around a run."""
