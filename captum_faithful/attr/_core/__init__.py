"""One module per attribution method."""
