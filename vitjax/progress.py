"""Progress bars that stay readable in a terminal and in CI logs.

In a terminal a bar redraws at most once a second; when stderr is not a
terminal (CI, a redirected log) each redraw is a new line, so it prints at
most every 30 seconds instead.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm

from vitjax import sharding

TERMINAL_INTERVAL_S = 1.0
LOG_INTERVAL_S = 30.0


def bar(total: int, desc: str, *, enabled: bool = True, **kwargs: Any) -> tqdm:
  """A tqdm bar over `total` items labelled `desc`; a silent one when not
  `enabled`, and in every process but process 0 of a multi-process run (they
  would all draw the same global figures)."""
  interval = TERMINAL_INTERVAL_S if sys.stderr.isatty() else LOG_INTERVAL_S
  enabled = enabled and sharding.is_writer()
  return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True,
              mininterval=interval, maxinterval=max(interval, 10.0), **kwargs)
