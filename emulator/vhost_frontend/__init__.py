"""The vhost-user front-end: the emulator's virtio device whose queues and config live in an
external vhost-user back-end.

Rooms (crosvm's vhost_user_frontend and rust-vmm/vhost's ``Frontend``, in Python):

- ``frontend.py``   ``VhostUserFrontend``: the ``VirtioDevice`` the transport talks to (config
  cache, activation, deactivation, reset, kicks, call fds and their relay, memory-table
  re-sends) and the ``ChannelHandler`` the back-end channel dispatches to.
- ``connection.py`` ``BackendConnection``: the main socket. Connect, negotiate, reconnect, and
  one typed method per request; ``_call`` is the one place that sends a request and waits for
  its reply (REPLY_ACK included), ``_block_until_reply`` the one place that waits.
- ``channel.py``    ``BackendChannel``: the back-end channel socket served on the event loop;
  SHMEM_MAP/SHMEM_UNMAP go to a ``SharedMemory`` (``SharedMemoryBar``), CONFIG_CHANGE_MSG to
  the device, each answered with a u64 status.
- ``stream.py``     ``MessageStream``: a socket and its decoder, the I/O boundary of both rooms
  (one DEBUG line and one ``--trace`` record per message).

What blocks what
----------------
Everything runs on the emulator's single event loop, together with the vfio-user socket.
A guest access (QEMU's REGION_READ/REGION_WRITE) is handled to completion before the loop
reads the next message, and a front-end call that needs the back-end's answer waits for it in
``BackendConnection._block_until_reply``: a ``select`` on the main socket and the back-end
channel, nothing else. While it waits:

- served: the back-end channel (SHMEM_MAP/UNMAP, CONFIG_CHANGE_MSG), so a back-end that maps
  memory and waits for our status before it answers us cannot deadlock us;
- not served: the vfio-user socket (every other guest access, from any vCPU, including BAR 4
  reads that need no back-end at all), loop timers (reconnect attempts), the relay of call fds
  for vectors without an MSI-X eventfd, the monitor socket, and a SIGTERM's stop (taken when
  the wait ends).
  Interrupts through MSI-X eventfds do not pass through us and are not delayed.

Each wait lasts at most ``--backend-timeout`` seconds (``config.backend_timeout``). A wait
that times out, a reply out of order, bad framing or a dead socket drops the connection
(DEVICE_NEEDS_RESET, reconnect in the background), so the remaining calls of the same
operation fail at once with ``BackendFailure``. One guest access therefore waits at most one
timeout behind a silent back-end, and at most (waits of its operation) x timeout behind one
that answers each request just in time.

Which calls wait, and why they cannot answer the guest first:

- guest reads the device config (BAR 2 device-config window): GET_CONFIG, one wait, only
  when the cache is empty (after reset, CONFIG_CHANGE_MSG or a config write). The
  REGION_READ reply carries the bytes, so there is nothing to answer with before the
  back-end does.
- guest writes the device config: SET_CONFIG; one wait with REPLY_ACK, none without.
- guest sets DRIVER_OK: ``activate``; with REPLY_ACK each of SET_FEATURES, SET_MEM_TABLE and
  per queue SET_VRING_NUM, _ADDR, _BASE, _CALL, _KICK, _ENABLE waits for its ack (2 + 6 per
  queue), without it none does. The acks turn a refusal into DEVICE_NEEDS_RESET before the
  guest reads the status back.
- guest resets the device or turns bus mastering off: ``deactivate`` sends GET_VRING_BASE per
  running queue (a typed reply, always waited for: the rings must have stopped before the
  driver is told the reset is done and frees them), then ``reset`` sends RESET_DEVICE (one
  wait with REPLY_ACK). A reset drops the shared-memory mappings first (the transport does,
  before either message), so what the back-end maps in answer, served during these waits,
  stays mapped.
- QEMU changes an MSI-X eventfd (SET_IRQS): SET_VRING_CALL per running queue whose fd changed.
- QEMU maps or unmaps guest memory (DMA_MAP/DMA_UNMAP) while the device runs: SET_MEM_TABLE.
  The back-end must have the new table before the old memory goes.
- a reconnect (a loop timer every ``RECONNECT_INTERVAL`` s after a loss): negotiation, up to
  6 waits (GET_FEATURES, GET_PROTOCOL_FEATURES, GET_QUEUE_NUM, GET_SHMEM_CONFIG, and with
  REPLY_ACK SET_OWNER and SET_BACKEND_REQ_FD), on the loop like the rest.
- start-up: ``connect_blocking`` waits for the back-end's socket (``--backend-connect-timeout``
  seconds at most, else as long as it takes), then negotiates as above; the loop is not
  running and the vfio-user socket not yet listening. The back-end channel is not served
  during this first negotiation (``ChannelHandler.ready``): a SHMEM_MAP sent then waits until
  BAR 4 exists instead of being refused.

Never waited for: kicks (an eventfd write), the call-fd relay (an eventfd read), the back-end
channel's reads (MSG_DONTWAIT; a flood is served at most ``CHANNEL_BATCH`` reads per wake-up).
Sends are blocking writes: on the back-end channel bounded by SO_SNDTIMEO (the same timeout);
on the main socket unbounded, but every message is at most 4 KiB and the kernel buffer takes
it unless the back-end has stopped reading more than a socket buffer of requests ago.
"""
