"""Loaded at start-up by any Python process whose PYTHONPATH holds this directory: when
``DBAAS_TEST_FORBIDDEN_IMPORTS`` names modules (comma-separated), importing one of them
fails, and the attempt is appended to the file ``DBAAS_TEST_IMPORT_LOG``. Tests start
processes that must never load the database layer with it, then read the log: an attempt
that the process swallowed is still seen."""

import os
import sys
import traceback

_FORBIDDEN = tuple(filter(None, os.environ.get("DBAAS_TEST_FORBIDDEN_IMPORTS", "").split(",")))
_LOG = os.environ.get("DBAAS_TEST_IMPORT_LOG")


class _Forbid:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if any(name == f or name.startswith(f + ".") for f in _FORBIDDEN):
            if _LOG:
                with open(_LOG, "a") as log:
                    log.write(f"pid {os.getpid()} {' '.join(sys.argv)[:200]} imported {name}:\n"
                              + "".join(traceback.format_stack(limit=12)) + "\n")
            raise ImportError(f"{name} is forbidden in this process (test import guard)")
        return None


if _FORBIDDEN:
    sys.meta_path.insert(0, _Forbid)
