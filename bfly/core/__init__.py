"""The training core: config, environment, models, data, engine, assembly, optimiser, EMA, checkpoint format. Knows nothing of runs or jobs."""
