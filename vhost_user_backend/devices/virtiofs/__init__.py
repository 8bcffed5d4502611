"""``vhost-device-fs``: a virtio-fs back-end with a DAX window, on the back-end library.

``fuse`` holds the FUSE messages, ``server`` a FUSE file system over one host directory,
``window`` the DAX window's mapping rules, ``device`` the vhost-user device, ``__main__`` the
command.
"""
