"""The one user-error type: the CLI prints its message on one line and exits 1."""


class UserError(Exception):
    pass
