"""One place where every command turns an expected error into one line: `error: ...` and a non-zero exit.

Expected are ValueError (a bad flag, file, line, field or tensor; formats.DataError is one) and OSError (a
path that is missing, unreadable or unwritable); their messages name the culprit. Anything else is a bug
and keeps its traceback, to be reported.
"""
import sys
from contextlib import contextmanager


@contextmanager
def one_line_errors():
    try:
        yield
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
