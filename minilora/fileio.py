"""Crash-safe writes: nothing on disk is ever half-written.

Files are written to a temporary name in the same directory, flushed to disk, then renamed
over the target (`os.replace` is atomic on POSIX), so a reader sees the old file or the new
one, never a torn one. Directories (checkpoints, adapters, merged models) get the same
treatment: built under a temporary sibling, then swapped in.

mkstemp/mkdtemp create 0600/0700 (private) entries; the results get the permissions a plain
open()/mkdir would give (0644/0755 under the usual umask 022), so a checkpoint or adapter is as
readable to others as the config.json written beside it.
"""

import contextlib
import os
import shutil
import tempfile


def fsync_dir(path):
    """Persist a rename: on POSIX the directory entry itself must be flushed."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def umask():
    """The process umask. Setting it is the only portable way to read it, so set it right back;
    meanwhile it is 077, so a file another thread creates in that instant is private, never open."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path, mode="wb"):
    """Open a temporary file beside `path`; on success it replaces `path`, on error it vanishes."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, mode) as f:
            os.fchmod(f.fileno(), 0o666 & ~umask())
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_directory(path, overwrite=True):
    """Yield a temporary directory beside `path`; on success it becomes `path` in one rename.

    An existing `path` is moved aside (into a `.old` sibling) first and deleted only after the
    new one is in place. POSIX cannot swap two directories in one step, so a crash between the
    two renames leaves no `path` but the previous contents intact under `<.old sibling>/prev`
    (the trainer's checkpoint lookup recovers from there). With `overwrite=False` an existing
    `path` raises FileExistsError up front.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=parent)
    try:
        os.chmod(tmp, 0o777 & ~umask())
        yield tmp
        for name in os.listdir(tmp):  # files written with plain open() still reach the disk
            fp = os.path.join(tmp, name)
            if os.path.isfile(fp):
                with open(fp, "rb") as f:
                    os.fsync(f.fileno())
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix="." + os.path.basename(path) + ".", suffix=".old", dir=parent)
            os.replace(path, os.path.join(old, "prev"))
        os.replace(tmp, path)
        fsync_dir(parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
