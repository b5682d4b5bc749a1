"""Thin Ray Serve adapters over the Ray-free core in `app/`."""
