"""One module per CLI verb; see `seesay.cli`."""
