"""One module per source a bundle is built from."""
