"""Accuracy, flash-through and throughput measurements, runnable as modules."""
