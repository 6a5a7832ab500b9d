"""The sandbox's Python-level guards (`python-guards`), installed in the sandboxed interpreter
before the program runs: fork/exec/spawn/system/popen, subprocess, multiprocessing,
kill/killpg/setsid, signal sending, sockets, ctypes, file deletion/renaming/chmod/chown, and
opening files for writing outside the working directory all raise PermissionError.

Not imported there: the sandbox runs its interpreter with -I -S -B, where this package is not
importable. runner.py reads this file's text and passes it with `-c`, followed by the code that
calls `_install_guards()` and then runs the program; that code also uses the modules imported
here. The guards turn ordinary mistakes and naive attacks into clean failures, but a
determined program can get around them (the original functions stay reachable through the
interpreter's internals); only the OS-enforced protections (launcher.py) are a boundary.
Standard library only.
"""

import builtins
import io
import os
import sys
import types  # noqa: F401  (runner.py's code after the guards uses it)


def _install_guards():
    import _io
    import _posixsubprocess
    import _socket
    import posix
    import shutil
    import signal
    import socket
    import subprocess
    import multiprocessing.process

    root = os.path.realpath(os.getcwd())
    real_open, real_os_open, fsdecode, realpath = _io.open, os.open, os.fsdecode, os.path.realpath

    def refuse(what):
        def refused(*args, **kwargs):
            raise PermissionError(f"sandbox: {what} is not allowed")
        return refused

    def check_inside(path, action):
        if isinstance(path, int):
            return  # an already open descriptor
        resolved = realpath(fsdecode(path))
        if resolved != root and not resolved.startswith(root + os.sep):
            raise PermissionError(f"sandbox: {action} outside the working directory is not "
                                  f"allowed: {path!r}")

    def writes(mode):
        return isinstance(mode, str) and any(flag in mode for flag in "wax+")

    def open_guarded(file, mode="r", *args, **kwargs):
        if writes(mode):
            check_inside(file, "writing")
        return real_open(file, mode, *args, **kwargs)

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def os_open_guarded(path, flags, mode=0o777, *, dir_fd=None):
        if flags & write_flags:
            if dir_fd is not None:
                raise PermissionError("sandbox: os.open for writing with dir_fd is not allowed")
            check_inside(path, "writing")
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    real_mkdir = os.mkdir

    def mkdir_guarded(path, mode=0o777, *, dir_fd=None):
        if dir_fd is not None:
            raise PermissionError("sandbox: os.mkdir with dir_fd is not allowed")
        check_inside(path, "creating directories")
        return real_mkdir(path, mode)

    class FileIOGuarded(_io.FileIO):
        def __init__(self, file, mode="r", *args, **kwargs):
            if writes(mode):
                check_inside(file, "writing")
            super().__init__(file, mode, *args, **kwargs)

    class SocketRefused(socket.socket):
        def __init__(self, *args, **kwargs):
            raise PermissionError("sandbox: network access is not allowed")

    builtins.open = io.open = _io.open = open_guarded
    io.FileIO = _io.FileIO = FileIOGuarded
    os.open = posix.open = os_open_guarded
    os.mkdir = posix.mkdir = mkdir_guarded
    for name in ("fork", "forkpty", "system", "popen", "execv", "execve", "execl", "execle",
                 "execlp", "execlpe", "execvp", "execvpe", "spawnl", "spawnle", "spawnlp",
                 "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "posix_spawn",
                 "posix_spawnp", "kill", "killpg", "setsid", "setpgid", "setpgrp", "remove",
                 "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "truncate",
                 "chmod", "lchmod", "chown", "lchown", "fchown", "link", "symlink", "mkfifo",
                 "mknod", "chroot", "pidfd_open"):
        for module in (os, posix):
            if hasattr(module, name):
                setattr(module, name, refuse(f"os.{name}"))
    for name in ("rmtree", "move", "chown"):
        setattr(shutil, name, refuse(f"shutil.{name}"))
    for name in ("pthread_kill", "pidfd_send_signal"):
        if hasattr(signal, name):
            setattr(signal, name, refuse(f"signal.{name}"))
    subprocess.Popen = refuse("subprocess")
    _posixsubprocess.fork_exec = refuse("starting processes")
    multiprocessing.process.BaseProcess.start = refuse("multiprocessing")
    socket.socket = SocketRefused
    _socket.socket = SocketRefused
    for module, name in ((socket, "socketpair"), (_socket, "socketpair"), (socket, "fromfd"),
                         (socket, "create_connection"), (socket, "create_server")):
        if hasattr(module, name):
            setattr(module, name, refuse("network access"))
    sys.modules["ctypes"] = None
    sys.modules["_ctypes"] = None
