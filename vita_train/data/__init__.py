"""Datasets: class names of the released datasets and synthetic clips."""
