"""Errors a user can cause. The CLI prints their message (never a traceback)."""


class FacetclipError(Exception):
    """Base of every error a user can cause; its message says what to do about it."""


class CacheError(FacetclipError):
    """A cache directory is missing, damaged, or made with another recipe."""


class InputError(FacetclipError):
    """Input data (captions, images, model) cannot be used as given."""
