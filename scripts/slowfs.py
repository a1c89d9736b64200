#!/usr/bin/env python3
"""scripts/slowfs.py BACKING_DIR MOUNTPOINT [FSYNC_DELAY_S] — a slow disk, for real.

A FUSE passthrough of BACKING_DIR at MOUNTPOINT whose every fsync/fdatasync
(files and directories) sleeps FSYNC_DELAY_S seconds (default 2) before it is
done, like a saturated or failing volume. Everything else passes straight
through. Used by `scripts/drill.sh slow-disk`; needs libfuse3 and the PyPI
package mfusepy (the drill installs it into a venv). Runs in the foreground
until unmounted (fusermount3 -u MOUNTPOINT, or umount).
"""
import errno
import os
import sys
import time

from mfusepy import FUSE, FuseOSError, Operations


class SlowFsync(Operations):
    use_ns = True

    def __init__(self, root, delay):
        self.root = os.path.realpath(root)
        self.delay = delay

    def _p(self, path):
        return os.path.join(self.root, path.lstrip("/"))

    def getattr(self, path, fh=None):
        try:
            st = os.lstat(self._p(path))
        except OSError as e:
            raise FuseOSError(e.errno)
        keys = ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size",
                "st_atime_ns", "st_mtime_ns", "st_ctime_ns")
        out = {k.replace("_ns", ""): getattr(st, k) for k in keys}
        return out

    def readdir(self, path, fh):
        return [".", ".."] + os.listdir(self._p(path))

    def access(self, path, amode):
        if not os.access(self._p(path), amode):
            raise FuseOSError(errno.EACCES)

    def chmod(self, path, mode):
        os.chmod(self._p(path), mode)

    def chown(self, path, uid, gid):
        os.chown(self._p(path), uid, gid)

    def mkdir(self, path, mode):
        os.mkdir(self._p(path), mode)

    def rmdir(self, path):
        os.rmdir(self._p(path))

    def unlink(self, path):
        os.unlink(self._p(path))

    def rename(self, old, new):
        os.rename(self._p(old), self._p(new))

    def truncate(self, path, length, fh=None):
        if fh is not None:
            os.ftruncate(fh, length)
        else:
            os.truncate(self._p(path), length)

    def utimens(self, path, times=None):
        os.utime(self._p(path), ns=times)

    def statfs(self, path):
        st = os.statvfs(self._p(path))
        return {k: getattr(st, k) for k in (
            "f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail",
            "f_ffree", "f_files", "f_flag", "f_frsize", "f_namemax")}

    def open(self, path, flags):
        return os.open(self._p(path), flags)

    def create(self, path, mode, fi=None):
        return os.open(self._p(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)

    def read(self, path, size, offset, fh):
        return os.pread(fh, size, offset)

    def write(self, path, data, offset, fh):
        return os.pwrite(fh, data, offset)

    def flush(self, path, fh):
        return 0

    def release(self, path, fh):
        os.close(fh)
        return 0

    def fsync(self, path, datasync, fh):
        time.sleep(self.delay)
        if datasync:
            os.fdatasync(fh)
        else:
            os.fsync(fh)
        return 0

    def opendir(self, path):
        return 0

    def releasedir(self, path, fh):
        return 0

    def fsyncdir(self, path, datasync, fh):
        time.sleep(self.delay)
        return 0


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    delay = float(sys.argv[3]) if len(sys.argv) > 3 else 2.0
    FUSE(SlowFsync(sys.argv[1], delay), sys.argv[2], foreground=True,
         nothreads=False, allow_other=True)
