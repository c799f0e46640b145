"""Analyses built on capture and geometry: the model summary, the abstraction table, ..."""
