"""The queue database: models, series states, their transitions and the atomic claim of work."""
