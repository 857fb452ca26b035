"""What the raykd programs share on the command line."""

from __future__ import annotations

import argparse

__all__ = ["HelpFormatter"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Ends every option's help with ``(default: X)``, or ``(required)`` for a required option,
    unless the help already says which; on/off flags (no value) are left as they are."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or "required" in text or action.nargs == 0:
            return text
        if action.required and action.option_strings:
            return f"{text} (required)"
        return super()._get_help_string(action)
