"""adrec's Ray Serve application (see app.py)."""
