# Re-enter the host's network namespace through any visible /proc/*/ns/net and reach a listener on the
# host's loopback from there; then try a fresh user or network namespace of its own.
import ctypes, os, socket
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET, CLONE_NEWUSER = 0x40000000, 0x10000000
def reach(where):
    for family, address in ((socket.AF_INET, ("127.0.0.1", PORT)), (socket.AF_INET6, ("::1", PORT))):
        try:
            socket.create_connection(address, timeout=2).close()
            print("ESCAPED connected to the host's", address, where)
        except OSError as exc:
            print("contained connect", address, where, type(exc).__name__)
reach("from its own namespace")
for pid in sorted({p for p in os.listdir("/proc") if p.isdigit()} | {"1", str(HOST_PID)}):
    try:
        fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
    except OSError as exc:
        print("contained open ns", pid, type(exc).__name__)
        continue
    if libc.setns(fd, CLONE_NEWNET) == 0:
        reach(f"after setns into {pid}'s namespace")
    else:
        print("contained setns", pid, os.strerror(ctypes.get_errno()))
for flags in (CLONE_NEWUSER, CLONE_NEWNET, CLONE_NEWUSER | CLONE_NEWNET):
    if libc.unshare(flags) == 0:
        print("ESCAPED unshare", hex(flags))
    else:
        print("contained unshare", hex(flags), os.strerror(ctypes.get_errno()))
