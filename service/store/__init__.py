"""Where sessions are committed."""
