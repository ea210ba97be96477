"""stated.persist."""
