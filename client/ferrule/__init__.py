"""Ferrule client distribution: generated stubs (``ferrule.v1``) and the client (``ferrule.client``)."""

__version__ = "0.1.0"
