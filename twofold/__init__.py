"""Shared runtime for Twofold's three services: server bootstrap, metrics, logs, the CLI.

Kept deliberately small: only code that every service needs lives here, so that each
service package stays independent of the others.
"""

__version__ = "0.1.0"
