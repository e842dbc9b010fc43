"""Python clients for tests/userspace.rs, printed as "key=value" lines like the C probes.

    pyclient.py fileno HOST PORT     socket.socket(fileno=…) of a connected socket
    pyclient.py asyncio HOST PORT N  asyncio download of N pattern bytes (server.py stream)
"""

import asyncio
import hashlib
import os
import socket
import sys

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
