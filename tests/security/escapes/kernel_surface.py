# Syscalls that reach other processes or kernel attack surface: ptrace, process_vm_readv, keyrings,
# mount, chroot, bpf, io_uring, perf, userfaultfd; and privileges: setuid(0), capabilities.
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
SYSCALLS = {"ptrace": (101, 16, HOST_PID, 0, 0), "process_vm_readv": (310, HOST_PID, 0, 0, 0, 0, 0),
            "keyctl(get user keyring)": (250, 0, -4, 0), "add_key": (248, b"user", b"x", b"y", 1, -4),
            "mount": (165, b"none", b"/tmp", b"tmpfs", 0, 0), "chroot": (161, b"/tmp"),
            "bpf": (321, 0, 0, 0), "io_uring_setup": (425, 1, 0), "perf_event_open": (298, 0, 0, -1, -1, 0),
            "userfaultfd": (323, 0), "pivot_root": (155, b"/tmp", b"/tmp"), "reboot": (169, 0, 0, 0, 0)}
for name, (number, *args) in SYSCALLS.items():
    ret = libc.syscall(number, *[ctypes.c_char_p(a) if isinstance(a, bytes) else ctypes.c_long(a) for a in args])
    err = ctypes.get_errno()
    print("ESCAPED" if ret >= 0 else "contained", name, ret, os.strerror(err))
for uid in (0,):
    try:
        os.setuid(uid)
        print("ESCAPED setuid", uid)
    except OSError as exc:
        print("contained setuid", uid, type(exc).__name__)
status = open("/proc/self/status").read()
for field in ("CapEff", "CapPrm", "CapBnd", "NoNewPrivs", "Seccomp"):
    line = [l for l in status.splitlines() if l.startswith(field)][0]
    print(line)
    if field.startswith("Cap") and int(line.split()[1], 16) != 0:
        print("ESCAPED has capabilities", line)
    if field in ("NoNewPrivs", "Seccomp") and line.split()[1] == "0":
        print("ESCAPED without", field)
print("uid", os.getuid(), "gid", os.getgid(), "groups", os.getgroups())
