"""Datasets: sources, WebDataset sharding, manifests, storage and the shard reader."""
