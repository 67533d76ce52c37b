"""Errors a user can act on. The CLI prints them as one line and exits non-zero."""


class FactEditError(ValueError):
    """Bad input: a record, file, name or patch the user supplied is wrong. The message names it."""


class FingerprintMismatch(FactEditError):
    """A patch was computed on another base model."""
