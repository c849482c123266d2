"""Data: fetching raw files, splitting them, and loading the splits for training."""
