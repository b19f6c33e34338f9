"""Ferrule client: generated stubs (``ferrule.v1``) and the typed client (``ferrule.client``)."""

__version__ = "0.1.0"
