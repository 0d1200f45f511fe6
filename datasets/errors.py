"""The data layer's one error, in a module of its own: the command line catches it without
loading numpy (and so starts fast)."""


class DataError(ValueError):
    """Bad input data; the message names the file/line and says what to do."""
