"""stated.daemon."""
