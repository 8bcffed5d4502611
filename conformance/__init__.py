"""``virtio-emu check-backend``: a conformance report for a vhost-user back-end, no guest needed.

The tool is a scripted, tolerant front-end (``peer.py``) with its own guest memory and split
rings (``memory.py``); it negotiates, reads config and shared-memory configuration, activates
the rings, makes the back-end map (``stimuli.py``), resets and reconnects, and judges every
step against the spec (``checks.py``, one function per check id of ``verdict.CATALOGUE``).
``runner.py`` runs them in order (non-destructive first), ``target.py`` starts and restarts a
back-end given as ``-- CMD``, ``report.py`` writes the table, Markdown and JSON, and ``cli.py``
is the command. It imports the protocol packages and the back-end library's definitions (FUSE,
the control socket client), never the emulator: it must judge a back-end the way any front-end
would, without sharing our front-end's assumptions.
"""
