"""User-facing errors.

Anything a user can cause (a bad config, a missing file, an extractor that never matches) raises
`UserError`. The CLI prints its message as one line and exits with code 2; no traceback.
"""


class UserError(Exception):
    """A mistake in the user's input: one clear line, exit code 2."""


PREFIX = "ctxdistill: error: "  # how the CLI starts that line
