#!/usr/bin/env python3
"""`helm upgrade --install` and `helm uninstall` with the real Helm engine (PyPI helm-python-sdk:
Helm's Go SDK through a C ABI), for hosts without a helm binary.

    helm.py install RELEASE CHART_DIR NAMESPACE [--set-json KEY=JSON ...] [--timeout S]
    helm.py uninstall RELEASE NAMESPACE

The cluster is the one KUBECONFIG names. Values are given as --set-json key.path=JSON. Prints
the release's status and the chart's NOTES.
"""

import argparse
import json
import os
import sys

import helm_python


def set_path(values: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    for key in keys[:-1]:
        values = values.setdefault(key, {})
    values[keys[-1]] = value


def config(namespace: str) -> "helm_python.Config":
    kubeconfig = os.environ.get("KUBECONFIG")
    if not kubeconfig:
        sys.exit("helm.py: KUBECONFIG is not set")
    return helm_python.Config(kubeconfig_path=kubeconfig, namespace=namespace)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    install = sub.add_parser("install")
    install.add_argument("release")
    install.add_argument("chart")
    install.add_argument("namespace")
    install.add_argument("--set-json", action="append", default=[], metavar="KEY=JSON")
    install.add_argument("--timeout", type=int, default=300)
    uninstall = sub.add_parser("uninstall")
    uninstall.add_argument("release")
    uninstall.add_argument("namespace")
    args = parser.parse_args()

    cfg = config(args.namespace)
    try:
        if args.command == "uninstall":
            cfg.uninstall(args.release, ignore_not_found=True, wait="watcher", timeout=120)
            print(f"release {args.release} uninstalled")
            return
        values: dict = {}
        for item in args.set_json:
            key, _, text = item.partition("=")
            set_path(values, key, json.loads(text))
        try:
            cfg.status(args.release)
            exists = True
        except helm_python.HelmNotFoundError:
            exists = False
        if exists:
            release = cfg.upgrade(args.chart, args.release, values, namespace=args.namespace,
                                  wait="watcher", timeout=args.timeout)
        else:
            release = cfg.install(args.chart, args.release, values, namespace=args.namespace,
                                  create_namespace=True, wait="watcher", timeout=args.timeout)
    except helm_python.HelmError as error:
        sys.exit(f"helm.py: {args.command} {args.release}: {error}")
    print(f"release {args.release} {'upgraded' if exists else 'installed'}: revision "
          f"{release.get('revision')}, {release.get('status')}, chart {release.get('chart_version')}")
    notes = release.get("notes")
    if notes:
        print(notes.rstrip())


if __name__ == "__main__":
    main()
