"""stated.tools."""
