"""Root works in a cache with no more rights than the cache's owner.

A data manager often runs ``dtool cache`` as root.  In a cache that belongs to someone else,
that owner controls every name in it, and root acting on names it does not control is how
``/tmp`` races are made.  So, as logrotate does with its ``su`` directive, a command run as
root first does what only root may do (adopt the bookkeeping for the cache's owner, through
descriptors: see :mod:`cachefs`), then gives up root for good and works as the cache's owner.
In a cache root owns itself, root stays root: there every name it uses belongs to root
(the bookkeeping is root's and not group-writable, the cache directory sticky), and
everything else it reaches through descriptors.  Library calls never change a process's
identity: the hooks and the API only use descriptors, and refuse what needs more.
"""

from __future__ import annotations

import os

from .facilities import pwd
from . import cachefs
from .errors import UnsafeCache


def work_as_cache_owner(cache_dir: str) -> None:
    """As root: repair the bookkeeping, then, in a cache owned by another user, become that
    user (uid, gid and groups) for the rest of the process.  Anyone else: nothing."""
    if os.geteuid() != 0 or not os.path.isdir(cache_dir):
        return
    owner = os.stat(cache_dir).st_uid
    account = None
    if owner != 0:
        try:
            account = pwd.getpwuid(owner)
        except KeyError:
            raise UnsafeCache(f"{cache_dir} belongs to uid {owner}, which has no account: "
                              "run the command as that uid, not as root") from None
    with cachefs.open_cache(cache_dir, create=True, repair=True) as cache:
        if cache.root_stat.st_uid != owner:
            raise UnsafeCache(f"{cache_dir} changed owner while we looked; try again")
    if account is None:
        return
    os.setgroups(os.getgrouplist(account.pw_name, account.pw_gid))
    os.setgid(account.pw_gid)
    os.setuid(owner)
