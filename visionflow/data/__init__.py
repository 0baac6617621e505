"""Data: dataset splits, downloads, image decoding, fingerprints, validation, near-duplicates, data
changes, the decoded cache, loaders, transforms and the transform preview."""
