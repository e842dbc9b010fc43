#!/usr/bin/env python3
"""Both ends of the RDMA upgrade tests (e2e/tests/rdma.rs), as ordinary socket programs.

  upgrade_peer.py serve HOST PORT [--banner] [--accept-delay S]
      Serves connections one at a time: optionally sends "HELLO\\n" first (a server that
      speaks first), reads one line, prints "first <hex of the first 16 bytes it read>",
      answers "ECHO <line>" and closes. --accept-delay sleeps before each accept (a server
      whose application is slow: the client's bytes wait in the queue).

  upgrade_peer.py ask HOST PORT [--banner] [--repeat N] [--bulk BYTES]
      Connects (printing "connect_ms <ms>" for the blocking connect), optionally reads the
      banner line (printing "banner <line>"), sends "ping\\n" and prints "reply <line>";
      N times, one connection after the other, in one process. --bulk: then sends BYTES of a
      pattern, shuts down writing and prints "sent <count> <sha256>" and the server's
      "sum <count> <sha256>" (or "error <errno name>" if the connection failed).

  With --bulk the server reads to the end after its answer and sends "SUM <count> <sha256>".
"""
import errno
import hashlib
import socket
import sys
import time


def read_line(conn):
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def pattern(count):
    block = bytes((i * 31 + 7) % 251 for i in range(65536))
    return (block * (count // len(block) + 1))[:count]


def sink(conn):
    digest, count = hashlib.sha256(), 0
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            break
        digest.update(chunk)
        count += len(chunk)
    conn.sendall(b"SUM %d %s\n" % (count, digest.hexdigest().encode()))


def serve(host, port, banner, accept_delay, bulk=False):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(16)
    print("listening", flush=True)
    while True:
        if accept_delay:
            time.sleep(accept_delay)
        conn, _ = listener.accept()
        with conn:
            if banner:
                conn.sendall(b"HELLO\n")
            line = read_line(conn)
            print("first", line[:16].hex(), flush=True)
            conn.sendall(b"ECHO " + line)
            if bulk:
                try:
                    sink(conn)
                except OSError as e:
                    print("error", errno.errorcode.get(e.errno, e.errno), flush=True)


def ask(host, port, banner, bulk=0):
    conn = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    started = time.monotonic()
    conn.connect((host, port))
    print("connect_ms", round((time.monotonic() - started) * 1000, 1), flush=True)
    with conn:
        if banner:
            print("banner", read_line(conn).decode().strip(), flush=True)
        conn.sendall(b"ping\n")
        print("reply", read_line(conn).decode().strip(), flush=True)
        if bulk:
            data = pattern(bulk)
            try:
                conn.sendall(data)
                conn.shutdown(socket.SHUT_WR)
                print("sent", len(data), hashlib.sha256(data).hexdigest(), flush=True)
                print("sum", read_line(conn).decode().strip()[4:], flush=True)
            except OSError as e:
                print("error", errno.errorcode.get(e.errno, e.errno), flush=True)


def main():
    mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    banner = "--banner" in sys.argv
    delay = 0.0
    if "--accept-delay" in sys.argv:
        delay = float(sys.argv[sys.argv.index("--accept-delay") + 1])
    repeat = 1
    if "--repeat" in sys.argv:
        repeat = int(sys.argv[sys.argv.index("--repeat") + 1])
    bulk = 0
    if "--bulk" in sys.argv and mode == "ask":
        bulk = int(sys.argv[sys.argv.index("--bulk") + 1])
    if mode == "serve":
        serve(host, port, banner, delay, "--bulk" in sys.argv)
    else:
        for _ in range(repeat):
            ask(host, port, banner, bulk)


if __name__ == "__main__":
    main()
