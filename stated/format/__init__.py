"""stated.format."""
