"""The emulator's monitor: a local control socket (``--monitor-socket PATH``) that answers
JSON-line commands in the spirit of QMP, to inspect a running emulator and to inject faults.

- ``protocol.py``  the wire format, error classes and ``MonitorError``;
- ``commands.py``  ``MonitorCommands``: what each command reads or does (no sockets);
- ``server.py``    ``MonitorServer``: the socket on the emulator's loop, non-blocking;
- ``client.py``    ``MonitorClient``: the other end, for tests and scripts;
- ``cli.py``       ``virtio-emu monitor PATH COMMAND``: results, the mapping table, ``--png``
  (``draw.py``, with Pillow, imported only for that).

The counters ``query-counters`` reports are kept by the I/O boundaries themselves
(``emulator.counters``).
"""

from emulator.monitor.client import MonitorClient
from emulator.monitor.protocol import ErrorClass, MonitorError

__all__ = ["ErrorClass", "MonitorClient", "MonitorError"]
