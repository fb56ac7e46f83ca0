# Pretend the sandbox failed to start, hoping for "no reward" instead of a 0.
import sys
print("unshare: cannot open /proc/self/uid_map: Permission denied", file=sys.stderr)
print("bwrap: Creating new namespace failed: Operation not permitted", file=sys.stderr)
sys.exit(1)
