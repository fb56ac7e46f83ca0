# Leave the process cap by moving into the root cgroup, then raise the limits.
import os, resource
for path in ("/sys/fs/cgroup/cgroup.procs", "/sys/fs/cgroup/pids/cgroup.procs", "/sys/fs/cgroup/unified/cgroup.procs"):
    try:
        with open(path, "w") as f:
            f.write(str(os.getpid()))
        print("ESCAPED joined", path)
    except OSError as exc:
        print("contained", path, type(exc).__name__)
for limit in (resource.RLIMIT_NPROC, resource.RLIMIT_AS, resource.RLIMIT_CPU):
    try:
        resource.setrlimit(limit, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        print("ESCAPED raised limit", limit)
    except (ValueError, OSError) as exc:
        print("contained limit", limit, type(exc).__name__)
