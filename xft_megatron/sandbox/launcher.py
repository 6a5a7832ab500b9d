"""The sandbox's launcher: isolates itself, then execs the interpreter on the program.

`runner.run_program` starts it, and `runner.run_tests` twice (the tester, then the program,
each in a sandbox of its own) (`python -I -S -B -c "...import launcher; ...main()" DIR
PLAN`, from its own directory so the cached bytecode is used, without a `preexec_fn`: nothing
runs between the fork and exec), so the isolation is built by a single-threaded process of its
own rather than in the forked child of a threaded parent. It imports only the standard library:
it must not depend on the package being importable. The descriptors it is given pass to the
interpreter it execs and to nothing else: the process left behind as the PID namespace's
waiter closes all of them, so a pipe's write end dies with the interpreter that holds it.

PLAN is a dict, marshalled and hex-encoded (built by `runner._launch_plan`; marshal needs no
import, json costs a few milliseconds):
  workdir   the program's working directory (everything else read-only): a tmpfs of
            workdir_bytes bytes and workdir_files inodes holding a copy of its files, or
            where tmpfs cannot be mounted, the directory bind-mounted writable
  workdir_bytes, workdir_files
  argv      the interpreter command that runs the program (exec'd at the end)
  rlimits   [[resource, soft, hard], ...]
  namespaces  try user, network, PID and mount namespaces
  uid       as root: the unprivileged uid (and gid) the program runs as
  expose    directories the interpreter needs that sit under a directory other users cannot
            search (a 0700 home): a tmpfs with only these directories replaces that directory
  report_fd, max_fd, machine

What happens, in order (each step is reported in the first line written to `report_fd`):
  as root        new network, PID and mount namespaces owned by the initial user namespace (so
                 nothing inside can ever administer them), private mounts, then the uid drop
                 (groups cleared, gid and uid set), then a user namespace of its own.
  as a user      a user namespace first (own uid mapped to itself), the other namespaces owned
                 by it, the same mounts.
  then           rlimits, every capability dropped (bounding set, ambient, permitted,
                 effective, inheritable), PR_SET_NO_NEW_PRIVS, a seccomp filter, the
                 parent-death signal; checked in /proc/self/status before the exec.
As root, a non-zero uid, no capabilities, no_new_privs and the seccomp filter are required: if
any is missing the launcher refuses (a line starting with "!" on `report_fd`, exit 125) instead
of running the program with privileges.

The seccomp filter (x86_64 and aarch64; another architecture's calls are killed) returns EPERM
for mount and the new mount API, umount2, pivot_root, chroot, setns, unshare, clone with a
namespace flag, ptrace, process_vm_readv/writev, kcmp, pidfd_getfd, keyctl/add_key/request_key,
bpf, perf_event_open, userfaultfd, io_uring, open_by_handle_at, (f)init_module, delete_module,
kexec, reboot, swapon/off, acct, quotactl, syslog, clock and host name changes, iopl/ioperm, and
socket for any family but AF_UNIX; clone3 (whose flags it cannot read) gets ENOSYS, so the C
library falls back to clone.
"""

import ctypes
import marshal
import os
import resource
import select
import struct
import sys

import _signal  # not signal: its enums cost milliseconds at every start

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x20000, 0x10000000, 0x20000000, \
    0x40000000
CLONE_NAMESPACES = 0x7E020000  # NEWNS NEWCGROUP NEWUTS NEWIPC NEWUSER NEWPID NEWNET
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 8, 4096, 16384, 1 << 18
AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = -100, 0x8000, 1
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_SECCOMP = 1, 4, 24, 22
PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 38, 47, 4
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_KILL_PROCESS, SECCOMP_RET_ERRNO, SECCOMP_RET_ALLOW = 0x80000000, 0x50000, 0x7FFF0000
EPERM, ENOSYS, AF_UNIX = 1, 38, 1
LINUX_CAPABILITY_VERSION_3 = 0x20080522
REFUSED = 125  # exit status of a refusal; the report says why

# syscall numbers: x86_64 (arch/x86/entry/syscalls/syscall_64.tbl) and aarch64 (the generic
# table, include/uapi/asm-generic/unistd.h); numbers from 424 on are the same everywhere
_COMMON = {"pidfd_getfd": 438, "io_uring_setup": 425, "io_uring_enter": 426,
           "io_uring_register": 427, "open_tree": 428, "move_mount": 429, "fsopen": 430,
           "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
           "quotactl_fd": 443}
ARCHES = {
    "x86_64": dict(audit_arch=0xC000003E, x32_bit=0x40000000, clone=56, clone3=435, socket=41,
                   denied=dict(_COMMON, mount=165, umount2=166, pivot_root=155, chroot=161,
                               swapon=167, swapoff=168, reboot=169, sethostname=170,
                               setdomainname=171, init_module=175, delete_module=176,
                               finit_module=313, kexec_load=246, kexec_file_load=320,
                               ptrace=101, process_vm_readv=310, process_vm_writev=311,
                               setns=308, unshare=272, keyctl=250, add_key=248,
                               request_key=249, bpf=321, perf_event_open=298,
                               open_by_handle_at=304, name_to_handle_at=303, userfaultfd=323,
                               acct=163, quotactl=179, iopl=172, ioperm=173, kcmp=312,
                               syslog=103, settimeofday=164, clock_settime=227, adjtimex=159,
                               clock_adjtime=305, vhangup=153, lookup_dcookie=212, uselib=134,
                               fanotify_init=300)),
    "aarch64": dict(audit_arch=0xC00000B7, x32_bit=None, clone=220, clone3=435, socket=198,
                    denied=dict(_COMMON, mount=40, umount2=39, pivot_root=41, chroot=51,
                                swapon=224, swapoff=225, reboot=142, sethostname=161,
                                setdomainname=162, init_module=105, delete_module=106,
                                finit_module=273, kexec_load=104, kexec_file_load=294,
                                ptrace=117, process_vm_readv=270, process_vm_writev=271,
                                setns=268, unshare=97, keyctl=219, add_key=217,
                                request_key=218, bpf=280, perf_event_open=241,
                                open_by_handle_at=265, name_to_handle_at=264,
                                userfaultfd=282, acct=89, quotactl=60, kcmp=272, syslog=116,
                                settimeofday=170, clock_settime=112, adjtimex=171,
                                clock_adjtime=266, vhangup=58, lookup_dcookie=18,
                                fanotify_init=262)),
}
ARCHES["arm64"] = ARCHES["aarch64"]
MOUNT_SETATTR, OPEN_TREE = 442, 428
OPEN_TREE_CLONE, OPEN_TREE_CLOEXEC = 1, os.O_CLOEXEC
REQUIRED_AS_ROOT = ("no-caps", "no-new-privs", "seccomp")


class Refused(Exception):
    """A protection that must hold could not be applied: the program is not run."""


# --- seccomp ------------------------------------------------------------------------------------

def seccomp_program(arch: dict) -> bytes:
    """The BPF filter (struct sock_filter[]) for `arch`, see the module docstring."""
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|.., BPF_RET
    errno = lambda e: ("ret", SECCOMP_RET_ERRNO | e)  # noqa: E731
    code = [("op", ld, 0, 0, 4),  # seccomp_data.arch
            ("jump", jeq, arch["audit_arch"], None, "kill"),
            ("op", ld, 0, 0, 0)]  # seccomp_data.nr
    if arch["x32_bit"]:
        code.append(("jump", jge, arch["x32_bit"], "eperm", None))
    for nr in sorted(arch["denied"].values()):
        code.append(("jump", jeq, nr, "eperm", None))
    code += [("jump", jeq, arch["clone3"], "enosys", None),
             ("jump", jeq, arch["clone"], "clone", None),
             ("jump", jeq, arch["socket"], "socket", None),
             ("ret", SECCOMP_RET_ALLOW),
             ("label", "clone"), ("op", ld, 0, 0, 16),  # args[0], low 32 bits
             ("jump", jset, CLONE_NAMESPACES, "eperm", None), ("ret", SECCOMP_RET_ALLOW),
             ("label", "socket"), ("op", ld, 0, 0, 16),
             ("jump", jeq, AF_UNIX, None, "eperm"), ("ret", SECCOMP_RET_ALLOW),
             ("label", "eperm"), errno(EPERM),
             ("label", "enosys"), errno(ENOSYS),
             ("label", "kill"), ("ret", SECCOMP_RET_KILL_PROCESS)]
    labels, index = {}, 0
    for item in code:
        if item[0] == "label":
            labels[item[1]] = index
        else:
            index += 1
    out, index = [], 0
    for item in code:
        if item[0] == "label":
            continue
        if item[0] == "op":
            out.append(struct.pack("=HBBI", item[1], item[2], item[3], item[4]))
        elif item[0] == "ret":
            out.append(struct.pack("=HBBI", ret, 0, 0, item[1]))
        else:  # conditional jump: a target label, or None for the next instruction
            _, op, k, true, false = item
            offsets = [labels[t] - index - 1 if t else 0 for t in (true, false)]
            assert all(0 <= o < 256 for o in offsets), offsets
            out.append(struct.pack("=HBBI", op, offsets[0], offsets[1], k))
        index += 1
    return b"".join(out)


def install_seccomp(libc, machine: str) -> None:
    arch = ARCHES.get(machine)
    if arch is None:
        raise OSError(f"no seccomp syscall table for {machine}")
    program = seccomp_program(arch)
    buffer = ctypes.create_string_buffer(program, len(program))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    check(libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0),
          "seccomp")


# --- helpers ------------------------------------------------------------------------------------

def load_libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.unshare.argtypes = [ctypes.c_int]
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                           ctypes.c_void_p]
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                           ctypes.c_ulong]
    libc.capset.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    libc.syscall.restype = ctypes.c_long
    return libc


def check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def write_file(path: str, text: str, dir_fd=None) -> None:
    fd = os.open(path, os.O_WRONLY, dir_fd=dir_fd)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def map_own_ids(uid: int, gid: int, proc_fd=None) -> None:
    """In a fresh user namespace: map this uid and gid to themselves (no other id exists).
    `proc_fd`: a writable proc mount to use instead of /proc (which may be read-only)."""
    prefix = "self/" if proc_fd is not None else "/proc/self/"
    write_file(prefix + "setgroups", "deny", proc_fd)
    write_file(prefix + "uid_map", f"{uid} {uid} 1\n", proc_fd)
    write_file(prefix + "gid_map", f"{gid} {gid} 1\n", proc_fd)


def drop_bounding_set(libc) -> bool:
    cap, dropped = 0, True
    while True:
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            if ctypes.get_errno() == 22:  # EINVAL: past the last capability
                return dropped
            dropped = False
        cap += 1


def clear_capabilities(libc) -> None:
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = struct.pack("=Ii", LINUX_CAPABILITY_VERSION_3, 0)
    data = bytes(24)  # two (effective, permitted, inheritable) triples, all zero
    header_buf = ctypes.create_string_buffer(header, len(header))
    data_buf = ctypes.create_string_buffer(data, len(data))
    check(libc.capset(header_buf, data_buf), "capset")


def status_fields() -> dict:
    with open("/proc/self/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def checked_protections(root: bool) -> list:
    """What /proc/self/status confirms: capabilities, no_new_privs, seccomp mode."""
    s = status_fields()
    caps = [int(s.get(k, "1"), 16) for k in ("CapInh", "CapPrm", "CapEff", "CapAmb")]
    bounding = int(s.get("CapBnd", "1"), 16)
    found = []
    if not any(caps) and (bounding == 0 or not root):
        found.append("no-caps")
    if s.get("NoNewPrivs", "").strip() == "1":
        found.append("no-new-privs")
    if s.get("Seccomp", "").strip() == "2":
        found.append("seccomp")
    return found


# --- mounts -------------------------------------------------------------------------------------

class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def mount_setattr(libc, path: bytes, flags: int, set_flags: int = 0, clear_flags: int = 0) -> int:
    attr = MountAttr(set_flags, clear_flags, 0, 0)
    return libc.syscall(ctypes.c_long(MOUNT_SETATTR), ctypes.c_int(AT_FDCWD),
                        ctypes.c_char_p(path), ctypes.c_uint(flags), ctypes.byref(attr),
                        ctypes.c_size_t(ctypes.sizeof(attr)))


def private_top(path: str):
    """The highest directory on the way to `path` that other users cannot search, or None."""
    parts, current = [], os.path.realpath(path)
    while True:
        parts.append(current)
        if current == os.path.dirname(current):
            break
        current = os.path.dirname(current)
    for directory in reversed(parts):  # from / downwards
        if not os.stat(directory).st_mode & 0o001:
            return directory
    return None


def expose_private_dirs(libc, paths) -> bool:
    """Replace each private directory above `paths` by a tmpfs holding only those paths
    (bind-mounted): the interpreter stays reachable after the uid drop, and the rest of a
    private home is out of sight. Returns whether anything was replaced."""
    targets = {}
    for path in paths:
        real = os.path.realpath(path)
        top = private_top(real)
        if top is not None:
            targets.setdefault(top, []).append((real, os.open(real, os.O_PATH | os.O_DIRECTORY)))
    for top, binds in targets.items():
        check(libc.mount(b"tmpfs", top.encode(), b"tmpfs", MS_NOSUID | MS_NODEV,
                         b"mode=0755,size=1m"), f"tmpfs on {top}")
        for real, fd in binds:
            os.makedirs(real, mode=0o755, exist_ok=True)
            check(libc.mount(f"/proc/self/fd/{fd}".encode(), real.encode(), None,
                             MS_BIND | MS_REC, None), f"bind {real}")
            os.close(fd)
    return bool(targets)


def private_mounts(libc, plan: dict, root: bool):
    """A /proc of the new PID namespace, private directories replaced (root), a read-only
    filesystem except the working directory. Returns the names of what was applied and (root)
    a detached, writable clone of the new /proc for writing the user namespace's id maps once
    /proc is read-only (None where there is none)."""
    workdir = plan["workdir"].encode()
    if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        return [], None  # mounts could propagate to the host: mount nothing
    applied, proc_fd = [], None
    if libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None) == 0:
        applied.append("proc")
        if root:
            fd = libc.syscall(ctypes.c_long(OPEN_TREE), ctypes.c_int(AT_FDCWD),
                              ctypes.c_char_p(b"/proc"),
                              ctypes.c_uint(OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC))
            proc_fd = fd if fd >= 0 else None
    if root and plan["expose"] and expose_private_dirs(libc, plan["expose"]):
        applied.append("private-dirs-hidden")
    if mount_setattr(libc, b"/", AT_RECURSIVE, set_flags=MOUNT_ATTR_RDONLY) != 0:
        return applied, proc_fd
    if quota_workdir(libc, plan, root):
        applied.append("workdir-quota")
    elif (libc.mount(workdir, workdir, None, MS_BIND, None) != 0
            or mount_setattr(libc, workdir, 0, clear_flags=MOUNT_ATTR_RDONLY) != 0):
        raise Refused("the filesystem was made read-only but the working directory could not "
                      "be made writable again")
    os.chdir(workdir)  # the old cwd is the read-only mount under the new one
    applied.append("readonly-fs")
    return applied, proc_fd


def quota_workdir(libc, plan: dict, root: bool) -> bool:
    """The working directory becomes a tmpfs of at most plan["workdir_bytes"] bytes and
    plan["workdir_files"] inodes holding a copy of its files (the program's own): the program
    cannot fill the file system under it. False (nothing changed) where tmpfs cannot be
    mounted."""
    workdir = plan["workdir"]
    files = {}
    for name in os.listdir(workdir):
        path = os.path.join(workdir, name)
        if os.path.isfile(path) and not os.path.islink(path):
            with open(path, "rb") as f:
                files[name] = (f.read(), os.stat(path).st_mode & 0o777)
    owner = f",uid={plan['uid']},gid={plan['uid']}" if root and plan["uid"] else ""
    options = (f"size={plan['workdir_bytes']},nr_inodes={plan['workdir_files']},"
               f"mode=0700{owner}").encode()
    if libc.mount(b"tmpfs", workdir.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options) != 0:
        return False
    for name, (data, mode) in files.items():
        fd = os.open(os.path.join(workdir, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            os.write(fd, data)
            if owner:
                os.fchown(fd, plan["uid"], plan["uid"])
        finally:
            os.close(fd)
    return True


# --- the process tree ---------------------------------------------------------------------------

def become_namespace_init(max_fd: int) -> int:
    """Fork so the program becomes pid 1 of the new PID namespace. The forking process stays
    behind as the one the parent waits on and exits as its child did; returns (in the child)
    the read end of a pipe that reports the waiter's death."""
    alive_r, alive_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(alive_w)
        return alive_r
    os.close(alive_r)
    for fd in range(3, max_fd):  # let the parent see the exec (and the report) of the child
        if fd != alive_w:
            try:
                os.close(fd)
            except OSError:
                pass
    _, wait_status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(wait_status)
    if code < 0:
        try:
            _signal.signal(-code, _signal.SIG_DFL)
        except (OSError, ValueError):
            pass  # SIGKILL/SIGSTOP: no handler to reset
        os.kill(os.getpid(), -code)
    os._exit(code & 0xFF)


def isolate(libc, plan: dict) -> list:
    """Apply every protection to this process; returns the names of those in force."""
    root = os.geteuid() == 0
    uid = plan["uid"]
    applied = ["session", "env"]
    alive_fd = proc_fd = None
    if plan["namespaces"] and not root:
        own_uid, own_gid = os.geteuid(), os.getegid()
        if libc.unshare(CLONE_NEWUSER) == 0:
            map_own_ids(own_uid, own_gid)
            applied.append("userns")
    if plan["namespaces"] and libc.unshare(CLONE_NEWNET) == 0:
        applied.append("netns")
    if plan["namespaces"] and libc.unshare(CLONE_NEWPID | CLONE_NEWNS) == 0:
        alive_fd = become_namespace_init(plan["max_fd"])
        applied.append("pidns")
        mounted, proc_fd = private_mounts(libc, plan, root)
        applied += mounted
    for which, soft, hard in plan["rlimits"]:
        resource.setrlimit(which, (soft, hard))
    applied.append("rlimits")
    if root:
        if uid is None or uid == 0:
            raise Refused("running as root, the sandbox needs a non-zero uid to drop to "
                          "(SandboxLimits.drop_to_uid)")
        interpreter = plan["argv"][0]
        drop_bounding_set(libc)
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        check(libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0), "dumpable")  # /proc/self/*_map
        if not os.access(interpreter, os.X_OK):
            raise Refused(f"uid {uid} cannot execute {interpreter} (a private directory above "
                          f"it and no mount namespace to expose it)")
        applied.append(f"uid={uid}")
        if plan["namespaces"] and libc.unshare(CLONE_NEWUSER) == 0:
            map_own_ids(uid, uid, proc_fd)
            applied.append("userns")
        if proc_fd is not None:
            os.close(proc_fd)
    drop_bounding_set(libc)  # a new user namespace starts with a full one
    failures = []  # as a user, what the kernel refuses is left out of the report
    for step in (clear_capabilities,
                 lambda lib: check(lib.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs"),
                 lambda lib: install_seccomp(lib, plan["machine"])):
        try:
            step(libc)
        except OSError as e:
            failures.append(str(e))
    if alive_fd is not None:
        # set last: every change of credentials above clears it
        check(libc.prctl(PR_SET_PDEATHSIG, _signal.SIGKILL, 0, 0, 0), "parent-death signal")
        if select.select([alive_fd], [], [], 0)[0]:
            raise Refused("the launcher died before the program started")  # EOF: it is gone
        os.close(alive_fd)
    confirmed = checked_protections(root)
    applied += confirmed
    if os.getuid() != 0:
        applied.append("nproc")
    if root:
        missing = [p for p in REQUIRED_AS_ROOT if p not in confirmed]
        if missing or os.getuid() == 0:
            raise Refused(f"running as root, but {', '.join(missing) or 'the uid drop'} "
                          f"could not be applied ({'; '.join(failures) or 'not in force'})")
    return applied


def main() -> None:
    plan = marshal.loads(bytes.fromhex(sys.argv[1]))
    report_fd = plan["report_fd"]
    os.set_inheritable(report_fd, False)  # closed by the exec: the parent reads to EOF
    try:
        applied = isolate(load_libc(), plan)
    except (Refused, OSError) as e:
        os.write(report_fd, f"!{e}".encode())
        os._exit(REFUSED)
    os.write(report_fd, " ".join(applied).encode())
    try:
        os.execv(plan["argv"][0], plan["argv"])
    except OSError as e:
        os.write(report_fd, f"\n!cannot start {plan['argv'][0]}: {e}".encode())
        os._exit(REFUSED)


if __name__ == "__main__":
    main()
