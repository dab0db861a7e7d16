"""Operators shared by training, export and every backend."""
