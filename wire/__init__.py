"""What both wire stacks (vfio-user and vhost-user) share: errors, the payload base and the
SCM_RIGHTS transport. Nothing here knows either protocol's messages."""
