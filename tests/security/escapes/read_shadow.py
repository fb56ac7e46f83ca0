# Read the host's password hashes.
for path in ("/etc/shadow", "/etc/gshadow", "/root/.bash_history", "/root/.ssh/id_rsa"):
    try:
        with open(path) as f:
            print("ESCAPED read", path, f.read(40))
    except OSError as exc:
        print("contained", path, type(exc).__name__)
