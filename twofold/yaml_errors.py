"""One line for a YAML syntax error: `file:line:column: problem`, as editors and CI logs expect.

PyYAML's own message spans several lines (the context, a caret drawing, the problem); a
command-line tool reporting a bad file should name where it is and what is wrong, once.
"""

from __future__ import annotations

import yaml


def yaml_error_line(path: object, exc: yaml.YAMLError) -> str:
    """`path:line:column: not valid YAML: problem` (line and column 1-based when PyYAML knows them)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    return f"{where}: not valid YAML: {problem}" + (f" ({context})" if context else "")
