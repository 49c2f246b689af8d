"""The converter's one error type."""


class ConversionError(ValueError):
    """Bad input to a conversion (exit code 2); the message is one line with the fix."""
