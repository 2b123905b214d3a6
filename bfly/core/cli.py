"""What every command's `--help` shares: each option's default is shown."""

from __future__ import annotations

import argparse


def show_defaults(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds "(default: X)" to the help of each option that has a default its help does not already name
    (flags that are off by default, and options without a default, are left as they are)."""
    for action in parser._actions:
        if not action.option_strings or action.default in (None, False, [], argparse.SUPPRESS):
            continue
        text = action.help or ""
        if "default" not in text and text != argparse.SUPPRESS:
            action.help = f"{text} (default: %(default)s)".lstrip()
    return parser
