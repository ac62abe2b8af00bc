"""Backends run the two graphs (per-frame detector, token engine); the streaming loop is shared."""
