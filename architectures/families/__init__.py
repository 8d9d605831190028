"""Base architecture configs of every family (classic: developer C, v4: developer D)."""
