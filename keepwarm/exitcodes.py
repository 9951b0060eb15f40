"""The exit codes of every `keepwarm` command, in one place: they are part of the interface.

The numbers follow BSD's sysexits where one fits, so service managers and CronJobs can act
on them: a config error (78) is not worth restarting into, an unavailable port (69) is.
"""

from __future__ import annotations

EX_OK = 0
EX_FAIL = 1  # something failed that a retry may fix (counting tokens, a network error)
EX_USAGE = 2  # a bad command line
EX_NOT_ALL_WARM = 3  # once: a pair not warm/rewarmed; check: a pair below its minimum; either: no pairs
EX_DATAERR = 65  # simulate: a bad trace
EX_UNAVAILABLE = 69  # run: the metrics port is taken (transient: systemd's Restart= retries it)
EX_CONFIG = 78  # a bad config or an unreadable key file (RestartPreventExitStatus=78)
