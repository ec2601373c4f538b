"""Expert-style merges that keep per-task knowledge and pick it at inference (Twin-Merging)."""
