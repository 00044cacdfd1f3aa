"""Helpers shared by the attribution methods."""
