"""Driver interfaces and the drivers core ships."""
