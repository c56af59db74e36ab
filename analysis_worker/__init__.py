"""Analysis worker: exposures and metric events from the lake to experiment results."""
