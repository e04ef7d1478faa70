"""Backends: each implements one layer and direction of a sequence (see ``base.Backend``)."""
