"""`python -m mlplatform_gateway`: render and validate configs, make dev keys, print tokens.

  render  --variant local|compose|k8s [--files-dir D] [--set key.path=value ...] [--out F] [--validate]
  keys [--rotate | --retire-previous]  create (or keep) the dev signing key and its JWKS (rotate it with an
                                       overlap), and the dev TLS certificate with its CA
  token   --sub NAME [--tier T] [--ttl S] [--canary-tester]   print a signed RS256 token
  ready   [--admin-port P]             exit 0 when Envoy's admin /ready says LIVE (container HEALTHCHECK)
  drain   [--admin-port P] [--drain-time-s S] [--min-wait-s S]   drain Envoy before its SIGTERM (preStop hook)
  envoy   [--admin-port P] -- ENVOY_ARGS...   run Envoy; on SIGTERM/SIGINT drain it first, then stop it (the
                                       image's entrypoint: compose and `docker stop` lose no call either)
  route-sync --out F [--values V] [--namespace N] [--interval-s S] [--once]   keep Envoy's routes file equal to
                                       what the services' HTTPRoutes (Argo Rollouts' canary steps) ask for
(`--key-dir D` before the command picks the dev key directory; default .dev/gateway)
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from mlplatform_gateway import auth, render, routesync, tls
from mlplatform_gateway.local import (
    DEFAULT_KEY_DIR,
    DRAIN_TIME_S,
    ROOT,
    drain,
    is_live,
    prepare_files_dir,
    run_draining,
)


def parse_set(items: list[str]) -> dict[str, Any]:
    """`a.b=value` pairs -> nested overrides; values are parsed as YAML (numbers, lists, null)."""
    out: dict[str, Any] = {}
    for item in items:
        path, sep, raw = item.partition("=")
        if not sep or not path:
            raise SystemExit(f"--set wants key.path=value, got {item!r}")
        node = out
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw)
    return out


def dev_jwks(key_dir: Path) -> Path:
    """The dev key's JWKS file, creating the key when missing."""
    return auth.ensure_dev_keys(key_dir).jwks_path


def cmd_render(args: argparse.Namespace) -> int:
    overrides = parse_set(args.set)
    if args.files_dir:
        overrides["files_dir"] = str(args.files_dir)
    elif args.variant == "local":
        overrides["files_dir"] = str(prepare_files_dir(ROOT / ".run" / "gateway", dev_jwks(args.key_dir)))
    text = render.render(args.variant, overrides)
    if args.validate:
        with tempfile.TemporaryDirectory() as tmp:
            check = render.load_values(args.variant, overrides)
            files = Path(check["files_dir"])
            check_overrides = dict(overrides)
            if not files.exists():
                # Containers read /etc/envoy; check the same config against local copies.
                files = prepare_files_dir(Path(tmp) / "files", dev_jwks(args.key_dir))
                check_overrides["files_dir"] = str(files)
            tls_cfg = check.get("tls") or {}
            if tls_cfg.get("enabled") and not (Path(tls_cfg.get("dir") or files / "tls") / tls.CERT_FILE).exists():
                # The certificate comes from a mount (compose) or a Secret (Kubernetes): check with a dev one.
                certs = tls.ensure_dev_tls(Path(tmp))
                check_overrides["tls"] = {**tls_cfg, "dir": str(certs.directory)}
            upstream_tls = check["upstreams"].get("tls") or {}
            if upstream_tls.get("enabled") and not (
                    Path(upstream_tls.get("dir") or files / "upstream-tls") / tls.CERT_FILE).exists():
                # The gateway's client certificate comes from a Secret too: check with the dev one.
                mtls = tls.ensure_dev_mtls(Path(tmp), list(render.load_services()))
                check_overrides["upstreams"] = {**check_overrides.get("upstreams", {}),
                                                "tls": {**upstream_tls, "dir": str(mtls.gateway.directory)}}
            if render.render_secrets(args.variant, check_overrides):
                check_overrides["secrets_dir"] = tmp
                render.write_secrets(args.variant, check_overrides)
            text_for_check = render.render(args.variant, check_overrides) if check_overrides != overrides else text
            path = Path(tmp) / "envoy.yaml"
            path.write_text(text_for_check)
            render.validate(path)
        print(f"envoy accepts the {args.variant} config", file=sys.stderr)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    # The SDS files the TLS contexts name: locally where the config says (secrets_dir); for a container, beside
    # the written config (its directory is the config mount: secrets_dir in the container).
    secrets = render.render_secrets(args.variant, overrides)
    if secrets and (args.variant == "local" or args.out):
        into = None if args.variant == "local" else args.out.parent
        for written in render.write_secrets(args.variant, overrides, into):
            print(f"SDS file: {written}", file=sys.stderr)
    elif secrets:
        print(f"the config names SDS files ({', '.join(secrets)}): render with --out to write them beside it",
              file=sys.stderr)
    if not args.out:
        sys.stdout.write(text)
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    if args.rotate and args.retire_previous:
        raise SystemExit("--rotate and --retire-previous are two steps: run them apart")
    key = (auth.rotate_dev_keys(args.key_dir) if args.rotate else auth.retire_previous_keys(args.key_dir)
           if args.retire_previous else auth.ensure_dev_keys(args.key_dir))
    print(f"dev signing key: {args.key_dir / auth.PRIVATE_KEY_FILE} (kid {key.kid}); JWKS: {key.jwks_path}")
    certs = tls.ensure_dev_tls(args.key_dir)
    print(f"dev TLS: {certs.cert} (+ {certs.key.name}), signed by the dev CA {certs.ca}")
    mtls = tls.ensure_dev_mtls(args.key_dir, list(render.load_services()))
    print(f"dev mTLS (gateway -> services, MTLS=1): client {mtls.gateway.cert}, services {mtls.services.cert}, "
          f"internal CA {mtls.services.ca}")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    key = auth.ensure_dev_keys(args.key_dir)
    print(auth.mint_token(key, args.sub, ttl_s=args.ttl, tier=args.tier, canary_tester=args.canary_tester))
    return 0


def cmd_ready(args: argparse.Namespace) -> int:
    try:
        live = is_live(args.admin_port)
    except OSError as exc:
        print(f"gateway not ready: admin port {args.admin_port}: {exc}", file=sys.stderr)
        return 1
    if not live:
        print("gateway not ready: /ready is not LIVE", file=sys.stderr)
    return 0 if live else 1


def cmd_drain(args: argparse.Namespace) -> int:
    try:
        result = drain(args.admin_port, args.drain_time_s, min_wait_s=args.min_wait_s)
    except OSError as exc:
        print(f"gateway drain: admin port {args.admin_port}: {exc}", file=sys.stderr)
        return 1
    left = f"; {result.connections_left} idle client connection(s) left" if result.connections_left else ""
    print(f"gateway drained in {result.waited_s:.1f} s{left}", file=sys.stderr)
    return 0


def cmd_envoy(args: argparse.Namespace) -> int:
    envoy_args = args.envoy_args[1:] if args.envoy_args[:1] == ["--"] else args.envoy_args
    return run_draining(envoy_args, args.admin_port)


def cmd_route_sync(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s route-sync %(levelname)s %(message)s")
    overrides = yaml.safe_load(args.values.read_text()) if args.values else {}
    overrides = render.deep_merge(overrides or {}, parse_set(args.set))
    source = routesync.KubernetesRoutes(args.namespace, server=args.api_server, token_file=args.token_file,
                                        ca_file=args.ca_file, label_selector=args.label_selector)
    sync = routesync.RouteSync(source.list, args.out, variant=args.variant, overrides=overrides)
    if args.once:
        sync.step()
        return 0
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    sync.run(args.interval_s, stop=lambda: stopping)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlplatform_gateway", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--key-dir", type=Path, default=DEFAULT_KEY_DIR, help="dev signing key directory")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("render", help="render the Envoy config for a variant")
    p.add_argument("--variant", choices=render.VARIANTS, default="local")
    p.add_argument("--files-dir", type=Path, help="directory with descriptors.pb and jwks.json")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a value")
    p.add_argument("--out", type=Path)
    p.add_argument("--validate", action="store_true", help="check the result with `envoy --mode validate`")
    p.set_defaults(func=cmd_render)
    p = sub.add_parser("keys", help="create the dev signing key and JWKS if missing; rotate them")
    p.add_argument("--rotate", action="store_true",
                   help="a new signing key; the JWKS keeps trusting the old one (tokens it signed still pass)")
    p.add_argument("--retire-previous", action="store_true",
                   help="after a rotation, once old tokens have expired: the JWKS drops the old keys")
    p.set_defaults(func=cmd_keys)
    p = sub.add_parser("token", help="print a signed dev token")
    p.add_argument("--sub", required=True, help="the API key the gateway rate-limits by")
    p.add_argument("--tier", help="rate-limit tier claim (standard, pro, internal)")
    p.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (the gateway accepts up to 24 h)")
    p.add_argument("--canary-tester", action="store_true",
                   help=f"add the `{auth.CANARY_TESTER_CLAIM}: true` claim: the token's calls go to a running canary")
    p.set_defaults(func=cmd_token)
    p = sub.add_parser("ready", help="exit 0 when Envoy is LIVE (admin /ready)")
    p.add_argument("--admin-port", type=int, default=9901)
    p.set_defaults(func=cmd_ready)
    p = sub.add_parser("drain", help="fail Envoy's health check, drain its listeners, wait for the clients to go")
    p.add_argument("--admin-port", type=int, default=9901)
    p.add_argument("--drain-time-s", type=float, default=DRAIN_TIME_S,
                   help="at most this long (Envoy's --drain-time-s: its listeners close then)")
    p.add_argument("--min-wait-s", type=float, default=0.0,
                   help="at least this long (Kubernetes: the pod's endpoint removal reaching every client)")
    p.set_defaults(func=cmd_drain)
    p = sub.add_parser("envoy", help="run Envoy, draining it before it stops (SIGTERM/SIGINT)")
    p.add_argument("--admin-port", type=int, default=9901, help="Envoy's admin port (the config's admin address)")
    p.add_argument("envoy_args", nargs=argparse.REMAINDER, help="-- then Envoy's own arguments")
    p.set_defaults(func=cmd_envoy)
    p = sub.add_parser("route-sync", help="rewrite Envoy's routes file from the services' HTTPRoutes (canary steps)")
    p.add_argument("--out", type=Path, required=True, help="the routes file (the values' canary.routes_file)")
    p.add_argument("--variant", choices=render.VARIANTS, default="k8s")
    p.add_argument("--values", type=Path, help="YAML overrides the gateway's config was rendered with")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a value")
    p.add_argument("--namespace", default="mlplatform", help="where the HTTPRoutes are")
    p.add_argument("--label-selector", default=routesync.DEFAULT_LABEL_SELECTOR)
    p.add_argument("--api-server", help="Kubernetes API URL (default: the pod's in-cluster address)")
    p.add_argument("--token-file", type=Path, help="bearer token file (default: the pod's service account)")
    p.add_argument("--ca-file", type=Path, help="API server CA (default: the pod's service account)")
    p.add_argument("--interval-s", type=float, default=2.0, help="poll interval")
    p.add_argument("--once", action="store_true", help="one pass (write the routes file) and exit")
    p.set_defaults(func=cmd_route_sync)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (render.GatewayConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
