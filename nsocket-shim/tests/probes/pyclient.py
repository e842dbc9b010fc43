"""Python clients for tests/userspace.rs, printed as "key=value" lines like the C probes.

    pyclient.py fileno HOST PORT     socket.socket(fileno=…) of a connected socket
    pyclient.py asyncio HOST PORT N  asyncio download of N pattern bytes (server.py stream)
    pyclient.py many HOST PORT N S
        N connections open at once, each echoing its own token (server.py echo); prints "held"
        and keeps them until a line (or EOF) on stdin; then S sequential connections, each
        echoing a token and closed by us first (TIME-WAIT on our side)
"""

import asyncio
import hashlib
import os
import resource
import socket
import sys
import time

mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])


def out(line):
    print(line, flush=True)


if mode == "fileno":
    s = socket.create_connection((host, port))
    s.sendall(b"ping\n")
    out(f"echo={s.recv(16)!r}")
    again = socket.socket(fileno=os.dup(s.fileno()))
    out(f"family={again.family.name} type={again.type.name} proto={again.proto}")
    out(f"peer={again.getpeername()}")
    local = again.getsockname()
    out(f"local_ip={local[0]} local_port_set={int(local[1] != 0)}")
    out(f"nodelay={again.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)}")
    again.close()
    s.close()
elif mode == "asyncio":
    total = int(sys.argv[4])
    expected = hashlib.sha256(bytes(i % 251 for i in range(total))).hexdigest()

    async def main():
        reader, writer = await asyncio.open_connection(host, port)
        digest, got = hashlib.sha256(), 0
        while True:
            chunk = await reader.read(1 << 16)
            if not chunk:
                break
            digest.update(chunk)
            got += len(chunk)
        writer.close()
        await writer.wait_closed()
        out(f"bytes={got} sha256_ok={int(digest.hexdigest() == expected)}")
        peer = writer.get_extra_info("peername")
        out(f"peer={peer[0]}:{peer[1]}")

    asyncio.run(main())
elif mode == "many":
    n, sequential = int(sys.argv[4]), int(sys.argv[5])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, n + 256)), hard))

    def descriptors():
        return len(os.listdir("/proc/self/fd"))

    def echoed(c, token):
        c.sendall(token)
        got = b""
        while len(got) < len(token):
            chunk = c.recv(len(token) - len(got))
            if not chunk:
                break
            got += chunk
        return got == token

    warm = socket.create_connection((host, port))
    out(f"warm_ok={int(echoed(warm, b'warm'))}")
    warm.close()
    before = descriptors()
    started = time.perf_counter()
    conns = [socket.create_connection((host, port)) for _ in range(n)]
    ok = sum(echoed(c, b"c%d." % i) for i, c in enumerate(conns))
    seconds = time.perf_counter() - started
    out(f"concurrent={n} echoed_ok={ok} open_descriptors={descriptors() - before}")
    out(f"concurrent_seconds={seconds:.2f}")
    out("held")
    sys.stdin.readline()
    for c in conns:
        c.close()
    started, ok = time.perf_counter(), 0
    for i in range(sequential):
        c = socket.create_connection((host, port))
        ok += echoed(c, b"s%d." % i)
        c.close()
    seconds = time.perf_counter() - started
    out(f"sequential={sequential} echoed_ok={ok} leaked_descriptors={descriptors() - before}")
    out(f"sequential_per_second={sequential / seconds:.0f}")
