# Open another process's memory read-write: the launcher's (by its host pid) and every visible one.
import os
targets = {str(HOST_PID)} | {p for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()}
for pid in sorted(targets):
    try:
        with open(f"/proc/{pid}/mem", "r+b", buffering=0) as f:
            print("ESCAPED opened /proc/%s/mem read-write" % pid)
    except OSError as exc:
        print("contained", pid, type(exc).__name__)
