"""The code reward's harness: the solution and its tests in two sandboxes that share only plain values.

This file runs as a script inside each sandbox (standard library only, no project import), and is
imported by the project for its codec. Two roles, one process each:

* ``solution``: runs the model's code, then answers calls: a request names one of its top-level
  functions and carries plain arguments; the reply carries the plain result (or the exception's type
  and message).
* ``tests``: runs the test asserts, in a namespace where each of the solution's top-level functions is
  a proxy that sends such a request; then writes its verdict to a descriptor only the launcher reads.

Why two processes: code in the same interpreter as its tests can reach everything the tests hold
(patch `exec` or `compile`, read the verdict from the harness's frame, print it from a thread or an
exit hook, read the tests from the working directory) and the tests would compare its objects, whose
`__eq__` it defines. Here the solution's process never holds the tests, their expected values or the
verdict channel, and what comes back from it is decoded into fresh plain values (exact built-in types,
checked by type identity, never by the solution's methods), compared by the tests' own interpreter.

Supported values: None, bool, int, float, complex, str, bytes, and tuples, lists, dicts, sets and
frozensets of them. A call whose arguments or result hold anything else (an instance of the solution's
class, a generator, a function) raises TypeError in the tests, which then fail; so do tests that rely on
a function mutating its arguments in place: the solution works on copies.
"""
from __future__ import annotations

import builtins
import json
import os
import sys

MAX_DEPTH = 64  # nesting of one encoded value
MAX_MESSAGE_BYTES = 1 << 20  # one request or reply


# ------------------------------------------------------------------------------------ codec
def encode(value, depth: int = 0):
    """`value` as JSON-safe data that says its exact type; TypeError for anything but plain values."""
    if depth > MAX_DEPTH:
        raise TypeError(f"value nested deeper than {MAX_DEPTH}")
    kind = type(value)
    if value is None or kind is bool or kind is str:
        return value
    if kind is int:
        return {"int": int.__repr__(value)}
    if kind is float:
        return {"float": float.__repr__(value)}
    if kind is complex:
        return {"complex": [float.__repr__(value.real), float.__repr__(value.imag)]}
    if kind is bytes:
        return {"bytes": bytes.hex(value)}
    if kind is list:
        return [encode(v, depth + 1) for v in list.__iter__(value)]
    if kind is tuple:
        return {"tuple": [encode(v, depth + 1) for v in tuple.__iter__(value)]}
    if kind is set or kind is frozenset:
        return {kind.__name__: [encode(v, depth + 1) for v in kind.__iter__(value)]}
    if kind is dict:
        return {"dict": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in dict.items(value)]}
    raise TypeError(f"a {kind.__name__} cannot pass between the solution and the tests (plain values only)")


_COLLECTIONS = {"tuple": tuple, "set": set, "frozenset": frozenset}


def decode(data, depth: int = 0):
    """The plain value `encode` described; ValueError for anything else."""
    if depth > MAX_DEPTH:
        raise ValueError(f"value nested deeper than {MAX_DEPTH}")
    if data is None or type(data) in (bool, str):
        return data
    if type(data) is list:
        return [decode(v, depth + 1) for v in data]
    if type(data) is not dict or len(data) != 1:
        raise ValueError(f"not an encoded value: {type(data).__name__}")
    (tag, body), = data.items()
    if tag == "int" and type(body) is str:
        return int(body)
    if tag == "float" and type(body) is str:
        return float(body)
    if tag == "complex" and type(body) is list and len(body) == 2:
        return complex(float(body[0]), float(body[1]))
    if tag == "bytes" and type(body) is str:
        return bytes.fromhex(body)
    if tag in _COLLECTIONS and type(body) is list:
        return _COLLECTIONS[tag](decode(v, depth + 1) for v in body)
    if tag == "dict" and type(body) is list:
        if not all(type(p) is list and len(p) == 2 for p in body):
            raise ValueError("malformed dict")
        return {decode(k, depth + 1): decode(v, depth + 1) for k, v in body}
    raise ValueError(f"unknown tag {tag!r}")


# ---------------------------------------------------------------------------------- channel
class Channel:
    """Line-delimited JSON over two pipe ends."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self._reader = os.fdopen(read_fd, "rb", buffering=0)
        self._write_fd = write_fd
        self._buffer = b""

    def send(self, message) -> None:
        data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        view = memoryview(data)
        while view:
            view = view[os.write(self._write_fd, view):]

    def receive(self):
        """The next message, or None at end of stream."""
        while b"\n" not in self._buffer:
            if len(self._buffer) > MAX_MESSAGE_BYTES:
                raise ValueError(f"message longer than {MAX_MESSAGE_BYTES} bytes")
            chunk = self._reader.read(65536)
            if not chunk:
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)


def _keep_only(fds: set[int]) -> None:
    """Close every inherited descriptor but stdio and `fds`."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in fds:
            try:
                os.close(fd)
            except OSError:
                pass


# --------------------------------------------------------------------------------- solution
def serve_solution(source_path: str, read_fd: int, write_fd: int) -> None:
    channel = Channel(read_fd, write_fd)
    with open(source_path, encoding="utf-8") as f:
        source = f.read()
    namespace = {"__name__": "solution"}
    try:
        exec(compile(source, "solution.py", "exec"), namespace)
    except BaseException as exc:  # noqa: BLE001 - SystemExit included: the solution stopped early
        channel.send({"loaded": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
        return
    names = {}
    for name, value in list(namespace.items()):
        if name.startswith("__") or type(value).__name__ == "module":
            continue
        if callable(value):
            names[name] = "callable"
        else:
            try:
                names[name] = {"value": encode(value)}
            except TypeError:
                continue
    channel.send({"loaded": True, "names": names})
    while (request := channel.receive()) is not None:
        try:
            function = namespace[request["call"]]
            result = encode(function(*decode(request["args"]), **decode(request["kwargs"])))
        except BaseException as exc:  # noqa: BLE001 - reported to the tests as the call's exception
            channel.send({"raised": type(exc).__name__, "message": str(exc)[:300]})
            continue
        channel.send({"ok": result})


# ------------------------------------------------------------------------------------ tests
class SolutionError(Exception):
    """An exception raised by the solution whose type is not a built-in exception."""


class SolutionGone(Exception):
    """The solution's process ended or broke the protocol."""


def _exception(name: str, message: str) -> BaseException:
    cls = getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        return cls(message)
    return SolutionError(f"{name}: {message}")


def _proxy(channel: Channel, name: str):
    def call(*args, **kwargs):
        channel.send({"call": name, "args": encode(list(args)), "kwargs": encode(dict(kwargs))})
        reply = channel.receive()
        if type(reply) is not dict:
            raise SolutionGone("the solution's process stopped answering")
        if "ok" in reply:
            return decode(reply["ok"])
        if type(reply.get("raised")) is str and type(reply.get("message")) is str:
            raise _exception(reply["raised"], reply["message"])
        raise SolutionGone("malformed reply")

    call.__name__ = name
    return call


def run_test_file(tests_path: str, read_fd: int, write_fd: int, verdict_fd: int) -> None:
    channel = Channel(read_fd, write_fd)
    verdict = {"passed": False, "reason": "the tests did not finish"}
    try:
        hello = channel.receive()
        if type(hello) is not dict or hello.get("loaded") is not True:
            error = hello.get("error") if type(hello) is dict else None
            verdict["reason"] = f"the solution did not load: {error if type(error) is str else 'no answer'}"
            return
        namespace = {"__name__": "tests"}
        names = hello.get("names")
        for name, kind in (names.items() if type(names) is dict else ()):
            if type(name) is not str or not name.isidentifier():
                continue
            namespace[name] = _proxy(channel, name) if kind == "callable" else decode(kind["value"])
        with open(tests_path, encoding="utf-8") as f:
            tests = f.read()
        exec(compile(tests, "tests.py", "exec"), namespace)
        verdict = {"passed": True, "reason": "all tests passed"}
    except AssertionError as exc:
        verdict["reason"] = f"assertion failed: {str(exc)[:300]}" if str(exc) else "assertion failed"
    except BaseException as exc:  # noqa: BLE001 - any other failure of the tests is a failure
        verdict["reason"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    finally:
        sys.stdout.flush()
        os.write(verdict_fd, json.dumps(verdict).encode())
        os._exit(0)


def main(argv: list[str]) -> None:
    role, path, *fds = argv
    numbers = [int(fd) for fd in fds]
    _keep_only(set(numbers))
    if role == "solution":
        serve_solution(path, *numbers)
    elif role == "tests":
        run_test_file(path, *numbers)
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
