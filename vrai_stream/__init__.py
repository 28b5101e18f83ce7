"""vrai-stream."""
