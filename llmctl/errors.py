"""User-facing errors: anything raised as UserError ends the command with one `error:` line and exit 2."""


class UserError(Exception):
    """A mistake in the user's input (file, recipe, data, checkpoint). Printed as `error: <message>`, exit 2."""
