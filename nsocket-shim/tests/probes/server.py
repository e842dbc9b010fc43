"""The kernel TCP server side of tests/userspace.rs: one MODE per probe, run without the shim in
the server's namespace. Prints "listening", then "peer PORT" for every connection it accepts
and what it observed ("key=value"); exits after CONNS connections.

    server.py MODE PORT [CONNS] [ARG]
"""

import errno
import resource
import socket
import struct
import sys
import threading
import time

mode, port = sys.argv[1], int(sys.argv[2])
conns = int(sys.argv[3]) if len(sys.argv) > 3 else 1
arg = sys.argv[4] if len(sys.argv) > 4 else None
lock = threading.Lock()
# Up to a thousand connections at once (tests/userspace.rs many).
resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)


def out(line):
    with lock:
        print(line, flush=True)


PATTERN = bytes(i % 251 for i in range(251 * 4300))


def pattern(offset, n):
    """`n` bytes of the pattern from `offset` (< 251); n up to 1 MiB."""
    return PATTERN[offset : offset + n]


def read_all(c):
    data = bytearray()
    try:
        while True:
            chunk = c.recv(1 << 16)
            if not chunk:
                return bytes(data), "eof"
            data += chunk
    except OSError as e:
        return bytes(data), errno.errorcode.get(e.errno, str(e.errno))


def handle(c):
    if mode == "echo":
        while True:
            chunk = c.recv(1 << 16)
            if not chunk:
                break
            c.sendall(chunk)
    elif mode == "collect":
        data, end = read_all(c)
        lines = sorted(line for line in data.decode().split("\n") if line)
        out(f"received={','.join(lines)} end={end}")
        c.sendall(("got " + ",".join(lines)).encode())
    elif mode == "drain":
        time.sleep(float(arg or 1.5))
        data, end = read_all(c)
        out(f"drained_end={end}")
    elif mode == "et_in":
        c.sendall(b"a" * 1000)
        time.sleep(0.5)
        c.sendall(b"b" * 1000)
        time.sleep(0.3)
        c.shutdown(socket.SHUT_WR)
        data, end = read_all(c)
        out(f"got={data.decode()} end={end}")
    elif mode == "nested":
        time.sleep(0.3)
        c.sendall(b"x")
        data, end = read_all(c)
        out(f"end={end}")
    elif mode == "count":
        total, ok, end = 0, True, "eof"
        try:
            while True:
                chunk = c.recv(1 << 20)
                if not chunk:
                    break
                if chunk != pattern(total % 251, len(chunk)):
                    ok = False
                total += len(chunk)
        except OSError as e:
            end = errno.errorcode.get(e.errno, str(e.errno))
        out(f"bytes={total} pattern_ok={int(ok)} end={end}")
    elif mode == "unread":
        c.sendall(b"u" * 1000)
        c.settimeout(5)
        try:
            chunk = c.recv(100)
            out("recv=" + ("eof" if not chunk else "data"))
        except socket.timeout:
            out("recv=timeout")
        except OSError as e:
            out("recv=" + errno.errorcode.get(e.errno, str(e.errno)))
    elif mode == "halfclose":
        c.sendall(b"hello")
        c.shutdown(socket.SHUT_WR)
        data, end = read_all(c)
        out(f"got={data.decode()} end={end}")
    elif mode == "rst":
        c.sendall(b"r" * 5000)
        time.sleep(0.1)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    elif mode == "stream":
        # ARG bytes of the pattern, in 16 KiB pieces, ~4 MB/s; then close.
        total, sent = int(arg), 0
        try:
            while sent < total:
                n = min(16384, total - sent)
                c.sendall(pattern(sent % 251, n))
                sent += n
                time.sleep(0.004)
        except OSError as e:
            out("send=" + errno.errorcode.get(e.errno, str(e.errno)))
    c.close()


# Dual stack: IPv4 clients and IPv6 ones (tests/userspace.rs ipv6_*).
listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
listener.bind(("::", port))
listener.listen(16)
out("listening")
threads = []
for _ in range(conns):
    c, (_, peer, *_) = listener.accept()
    out(f"peer {peer}")
    t = threading.Thread(target=handle, args=(c,), daemon=True)
    t.start()
    threads.append(t)
for t in threads:
    t.join()
