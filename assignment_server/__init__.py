"""Assignment server: Confidence-compatible flag resolution, exposures and metric events."""
