"""The error raised for checkpoints that cannot be loaded."""


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, unsafe, of another architecture or inconsistent."""
