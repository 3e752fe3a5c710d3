"""One module per study axis: what its notebook runs, from params to record sections."""
