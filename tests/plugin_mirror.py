"""Loopback HTTP mirror fixture (in progress)."""
