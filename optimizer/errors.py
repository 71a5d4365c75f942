"""The one exception type users see: its message is a single line naming the problem and the fix."""


class MergeoptError(Exception):
    """A problem with the user's input or environment, reported as one clear line (no traceback)."""
