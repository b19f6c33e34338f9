"""Server interceptors, one concern each, composed in server/app.py."""
