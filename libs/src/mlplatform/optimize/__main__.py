"""python -m mlplatform.optimize --model cnn|sentiment [--quick] [--out build/optimize] [--install VERSION_DIR]

Makes every format of the model into `<out>/<model>/`, measures each one, and writes
`report.md`, `report.json` and plots there (see `mlplatform.optimize`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mlplatform.optimize.run import Options, run


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlplatform.optimize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model name (cnn, sentiment, or one --subject provides)")
    parser.add_argument("--subject", help="module:function returning the model's Subject (default: known models)")
    parser.add_argument("--version-dir", help="built model version to optimise (default model_repository/<model>/1)")
    parser.add_argument("--out", default="build/optimize", help="output root (default build/optimize)")
    parser.add_argument("--quick", action="store_true",
                        help="small held-out / latency sets, few fine-tune steps, no AOTInductor, no gateway")
    parser.add_argument("--no-aoti", action="store_true", help="skip AOTInductor (minutes of C++ compiling)")
    parser.add_argument("--threads", type=int, default=2, help="threads for accuracy and throughput (default 2)")
    parser.add_argument("--max-accuracy-drop", type=float, default=0.01,
                        help="accuracy bound below ONNX FP32 for a recommendation (default 0.01 = 1 point)")
    parser.add_argument("--gateway", help="gateway URL for the cloud comparison (else --stack starts one)")
    parser.add_argument("--token", help="gateway bearer token (with --gateway)")
    parser.add_argument("--stack", action="store_true", help="start the platform on loopback for the cloud figures")
    parser.add_argument("--repository", default="model_repository", help="model repository for --stack")
    parser.add_argument("--only", default="", help="comma-separated formats to make (plus the FP32 references "
                        "eager_fp32 and onnx), e.g. onnx_ortopt,onnx_int8_static; default all")
    parser.add_argument("--install", metavar="VERSION_DIR",
                        help="copy the servable formats into this model version and make them its runtime variants")
    args = parser.parse_args(argv)
    if args.threads < 1 or not 0 <= args.max_accuracy_drop < 1:
        parser.error("--threads must be >= 1 and --max-accuracy-drop in [0, 1)")
    if bool(args.gateway) != bool(args.token):
        parser.error("--gateway and --token go together")
    report = run(Options(model=args.model, subject=args.subject, version_dir=args.version_dir, out=args.out,
                         quick=args.quick, aoti=not args.no_aoti, threads=args.threads,
                         max_accuracy_drop=args.max_accuracy_drop, gateway=args.gateway, token=args.token,
                         stack=args.stack, repository=args.repository, install=args.install,
                         only=tuple(f for f in args.only.split(",") if f)))
    print(f"wrote {report['out']}/report.md; recommended: "
          + ", ".join(f"{t} {r['format'] or '-'}" for t, r in report["recommended"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
