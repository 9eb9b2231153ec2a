"""Weight formats: safe reading and writing, layout detection and key conversion."""
