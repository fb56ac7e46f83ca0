# Reach host services through Unix sockets: a path on the host's file system, an abstract name,
# and the usual daemons' sockets.
import socket
for address in (UNIX_PATH, "\0" + ABSTRACT_NAME, "/run/docker.sock", "/var/run/docker.sock", "/run/dbus/system_bus_socket"):
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(2)
        s.connect(address)
        print("ESCAPED connected to", repr(address))
    except OSError as exc:
        print("contained", repr(address), type(exc).__name__)
