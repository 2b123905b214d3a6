"""One line for an error message: what every command prints for a user error."""

from __future__ import annotations

_PREFIXES = ("bfly.", "DataError")


def one_line(e: BaseException | str, first: bool = False) -> str:
    """A message on one line. By default its last non-empty line: a DataLoader worker's error arrives
    with the worker's traceback in its message, and the cause is at the end (its "bfly....Error: "
    prefix is dropped). first=True keeps the first line instead, for errors that explain themselves
    first and add detail after (torch.load's)."""
    text = e if isinstance(e, str) else str(e)
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return "" if isinstance(e, str) else type(e).__name__
    if first:
        return lines[0]
    last = lines[-1]
    return last.split("Error: ", 1)[1] if last.startswith(_PREFIXES) and "Error: " in last else last
