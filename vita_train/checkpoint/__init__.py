"""Checkpoint formats: the official detectron2 one and the project's own, and the one loader for both."""
