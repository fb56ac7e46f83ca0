# Find the launcher's environment (and its secret) through /proc/*/environ and /proc/*/cmdline.
import os
for pid in os.listdir("/proc"):
    if not pid.isdigit():
        continue
    for name in ("environ", "cmdline"):
        try:
            with open(f"/proc/{pid}/{name}", "rb") as f:
                if SECRET.encode() in f.read():
                    print("ESCAPED secret found in", pid, name)
        except OSError as exc:
            print("contained", pid, name, type(exc).__name__)
if SECRET in str(dict(os.environ)):
    print("ESCAPED secret in own environment")
print("pids visible:", sorted(p for p in os.listdir("/proc") if p.isdigit()))
