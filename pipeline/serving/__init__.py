"""HTTP serving of published releases (FastAPI). Reads only releases, never run artifacts."""
