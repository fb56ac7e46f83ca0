# Signal the launcher and every process it can name.
import os, signal
for pid in [HOST_PID, os.getppid(), 1] + [int(p) for p in os.listdir("/proc") if p.isdigit()]:
    if pid <= 0:
        continue
    if pid == os.getpid():
        continue
    try:
        os.kill(pid, 0)
        print("can signal", pid)
    except OSError as exc:
        print("contained", pid, type(exc).__name__)
try:
    os.kill(HOST_PID, signal.SIGSTOP)
    print("ESCAPED stopped the launcher")
except OSError as exc:
    print("contained SIGSTOP", type(exc).__name__)
