"""stated.shm."""
