"""The vhost-user protocol, shared by both roles: every message (``messages``) and the sans-IO
codec (``codec``). The front-end lives in ``emulator.vhost_frontend``, the back-end library in
``vhost_user_backend``."""
