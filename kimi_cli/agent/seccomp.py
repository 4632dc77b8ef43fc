"""The Linux sandbox's seccomp filter (classic BPF, as `bwrap --seccomp FD` loads it): no setuid
or setgid files (outside they would be kimi's user's: root in CI), and with the host's network
no Unix sockets (abstract ones, X11's and D-Bus's, are in the network namespace).
"""

from __future__ import annotations

import errno
import platform
import struct

# linux/audit.h, linux/seccomp.h, linux/filter.h
_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_X32_BIT = 0x40000000  # x86_64's x32 ABI: other syscall numbers for the same calls
RET_ALLOW = 0x7FFF0000
RET_ERRNO = 0x00050000
_LD_ABS, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
S_ISUID_GID = 0o6000
O_CREAT_TMPFILE = 0o100 | 0o20000000

# name → (x86_64 number, aarch64 number, mode argument, flags argument or None).
_MODE_CALLS = {
    "open": (2, None, 2, 1), "creat": (85, None, 1, None), "chmod": (90, None, 1, None),
    "fchmod": (91, 52, 1, None), "mknod": (133, None, 1, None), "openat": (257, 56, 3, 2),
    "mknodat": (259, 33, 2, None), "fchmodat": (268, 53, 2, None),
    "fchmodat2": (452, 452, 2, None),
}
_SOCKET = (41, 198)  # socket(2) on x86_64, aarch64
AF_UNIX = 1
# Calls whose mode seccomp cannot see (a struct, a ring): refused, programs fall back.
_REFUSED = {"openat2": 437, "io_uring_setup": 425}


def supported() -> bool:
    return platform.machine() in _ARCH


def program(machine: str | None = None, unix_sockets: bool = True) -> bytes:
    """The filter as `struct sock_filter[]` bytes for this machine (x86_64 or aarch64); the
    rule of systemd's RestrictSUIDSGID= (chmod, open/creat and mknod with S_ISUID or S_ISGID
    fail), and socket(AF_UNIX) failing unless `unix_sockets` (socketpair still works)."""
    machine = machine or platform.machine()
    arch = _ARCH[machine]
    column = 0 if machine == "x86_64" else 1
    # (code, true-label, false-label, k); labels are names or None (the next instruction).
    ops: list[tuple] = [("ld", 4), ("jeq", arch, None, "enosys"), ("ld", 0)]
    if machine == "x86_64":
        ops.append(("jge", _X32_BIT, "enosys", None))
    for nr in _REFUSED.values():
        ops.append(("jeq", nr, "enosys", None))
    if not unix_sockets:
        ops += [("jeq", _SOCKET[column], None, "socket:end"), ("ld", 16),
                ("jeq", AF_UNIX, "eperm", None), ("socket:end:", None)]
    for name, row in _MODE_CALLS.items():
        nr, mode_arg, flags_arg = row[column], row[2], row[3]
        if nr is None:
            continue
        ops += [(f"{name}:", None), ("ld", 0), ("jeq", nr, None, f"{name}:end")]
        if flags_arg is not None:  # open's mode means something only when it creates
            ops += [("ld", 16 + 8 * flags_arg), ("jset", O_CREAT_TMPFILE, None, "allow")]
        ops += [("ld", 16 + 8 * mode_arg), ("jset", S_ISUID_GID, "eperm", "allow"),
                (f"{name}:end:", None)]
    ops += [("allow:", None), ("ret", RET_ALLOW), ("eperm:", None),
            ("ret", RET_ERRNO | errno.EPERM), ("enosys:", None), ("ret", RET_ERRNO | errno.ENOSYS)]
    return _assemble(ops)


def _assemble(ops: list[tuple]) -> bytes:
    labels, pc = {}, 0
    for op in ops:
        if op[0].endswith(":"):
            labels[op[0][:-1]] = pc
        else:
            pc += 1
    out, pc = [], 0
    for op in ops:
        if op[0].endswith(":"):
            continue
        if op[0] == "ld":  # the low 32 bits of seccomp_data at this offset (little-endian)
            out.append(struct.pack("<HBBI", _LD_ABS, 0, 0, op[1]))
        elif op[0] == "ret":
            out.append(struct.pack("<HBBI", _RET, 0, 0, op[1]))
        else:
            code = {"jeq": _JEQ, "jge": _JGE, "jset": _JSET}[op[0]]
            jt, jf = (0 if t is None else labels[t] - pc - 1 for t in op[2:4])
            out.append(struct.pack("<HBBI", code, jt, jf, op[1]))
        pc += 1
    return b"".join(out)
