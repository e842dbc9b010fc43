#!/usr/bin/env python3
"""Writes a single-layer OCI image archive from a directory, with no registry and no image tool.

    mkimage.py NAME:TAG ROOTFS_DIR OUT.tar [--entrypoint JSON] [--cmd JSON] [--user UID:GID]

`ctr -n k8s.io images import OUT.tar` imports it under NAME:TAG (the name travels in the
`io.containerd.image.name` annotation of index.json). The archive is reproducible: owners, modes
and times are normalised, so the same tree gives the same digest.
"""

import argparse
import hashlib
import io
import json
import os
import tarfile

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mtime = 0
    return info


def layer_of(root: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            rel = os.path.relpath(dirpath, root)
            if rel != ".":
                tar.add(dirpath, arcname=rel, recursive=False, filter=normalise)
            for name in sorted(filenames):
                tar.add(os.path.join(dirpath, name), arcname=os.path.normpath(os.path.join(rel, name)),
                        recursive=False, filter=normalise)
    return buf.getvalue()


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ref", help="image name with tag, e.g. localhost/stackroute/stackroute-lrd:lane")
    parser.add_argument("rootfs")
    parser.add_argument("out")
    parser.add_argument("--entrypoint", type=json.loads)
    parser.add_argument("--cmd", type=json.loads)
    parser.add_argument("--user")
    args = parser.parse_args()
    if ":" not in args.ref.rsplit("/", 1)[-1]:
        parser.error(f"{args.ref}: name the tag (NAME:TAG); 'latest' would make kubelet try to pull")

    layer = layer_of(args.rootfs)
    runtime = {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]}
    if args.entrypoint is not None:
        runtime["Entrypoint"] = args.entrypoint
    if args.cmd is not None:
        runtime["Cmd"] = args.cmd
    if args.user:
        runtime["User"] = args.user
    config = json.dumps({
        "architecture": "amd64", "os": "linux", "created": "1970-01-01T00:00:00Z",
        "config": runtime,
        "rootfs": {"type": "layers", "diff_ids": [digest(layer)]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "e2e/kube/mkimage.py"}],
    }, sort_keys=True).encode()
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest(config),
                   "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest(layer),
                    "size": len(layer)}],
    }, sort_keys=True).encode()
    index = json.dumps({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": OCI_MANIFEST, "digest": digest(manifest), "size": len(manifest),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"io.containerd.image.name": args.ref,
                            "org.opencontainers.image.ref.name": args.ref.rsplit(":", 1)[1]},
        }],
    }, sort_keys=True).encode()

    with tarfile.open(args.out, "w") as out:
        def put(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            out.addfile(info, io.BytesIO(data))
        put("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        put("index.json", index)
        for blob in (layer, config, manifest):
            put("blobs/sha256/" + digest(blob).split(":")[1], blob)
    print(f"{args.ref} {digest(manifest)} ({len(layer)} bytes)")


if __name__ == "__main__":
    main()
