"""Data: synthetic generators, real-dataset adapters, mixtures, packing and resumable loaders."""
