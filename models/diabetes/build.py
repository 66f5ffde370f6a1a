"""Deterministic build of the `diabetes` model: a config-only model, served by the generic model service.

    python models/diabetes/build.py --repository PATH [--version N] [--seed 7] [--force]

Predicts disease progression one year after baseline (a score, 25-346 in the data) from ten
baseline measurements of a patient, on the diabetes data set that ships with scikit-learn
(442 patients, Efron et al. 2004; in raw units, not the centred variant). Steps: split 80/20,
fit StandardScaler + RidgeCV (a linear model: on this data it matches gradient-boosted trees,
and float32 ONNX reproduces it exactly), evaluate on the held-out 20 % (MAE, R², against the
mean predictor), export to ONNX, check ONNX Runtime against scikit-learn on every row, and
write `model.onnx`, `config.json` and `sample.json` into `<repository>/diabetes/<version>/`.
The config declares each input column's valid range (the data's range widened by a margin),
which the generic service enforces. Same seed, same bytes (but `built_at`).
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from mlplatform.build import BuildError, build_arg_parser, json_bytes, log_step, reset_clock, run_build, write_version

NAME = "diabetes"
INPUT, OUTPUT = "features", "progression"
FEATURES = ["age", "sex", "bmi", "bp", "s1_tc", "s2_ldl", "s3_hdl", "s4_tch", "s5_ltg", "s6_glucose"]
PARITY_TOLERANCE = 1e-2  # score units (the target spans ~320): float32 ONNX vs float64 scikit-learn
MIN_R2 = 0.3  # held-out R² a trustworthy build must reach (the mean predictor scores ~0)


def limits(x: np.ndarray) -> dict[str, list[float]]:
    """Valid input ranges: the data's range widened by half its width each side (sex stays 1..2)."""
    lo, hi = x.min(axis=0), x.max(axis=0)
    margin = (hi - lo) / 2
    lo, hi = np.maximum(lo - margin, 0.0), hi + margin
    lo[1], hi[1] = 1.0, 2.0
    return {"min": [round(float(v), 4) for v in lo], "max": [round(float(v), 4) for v in hi], "names": FEATURES}


def build(repository: Path, version: int, seed: int, force: bool) -> Path | None:
    """Train, check and write one version; None when it exists already (and not `force`)."""
    reset_clock()
    target = repository / NAME / str(version)
    if (target / "config.json").is_file() and not force:
        log_step("skip", f"{target} exists (--force rebuilds)")
        return None
    import onnxruntime as ort
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.datasets import load_diabetes
    from sklearn.linear_model import RidgeCV
    from sklearn.metrics import mean_absolute_error, r2_score
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = load_diabetes(return_X_y=True, scaled=False)
    x = x.astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=seed)
    log_step("data", f"{len(x_train)} train / {len(x_test)} held-out patients, {x.shape[1]} features")
    model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13)))
    model.fit(x_train, y_train)
    pred = model.predict(x_test)
    mae, r2 = float(mean_absolute_error(y_test, pred)), float(r2_score(y_test, pred))
    baseline_mae = float(mean_absolute_error(y_test, np.full_like(y_test, y_train.mean())))
    log_step("evaluate", f"held-out MAE {mae:.1f} (mean predictor {baseline_mae:.1f}), R² {r2:.3f}")
    if r2 < MIN_R2:
        raise BuildError(f"held-out R² {r2:.3f} is below {MIN_R2}")
    onnx_model = convert_sklearn(model, initial_types=[(INPUT, FloatTensorType([None, x.shape[1]]))],
                                 final_types=[(OUTPUT, FloatTensorType([None, 1]))], target_opset=17)
    onnx_bytes = onnx_model.SerializeToString()
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT], {INPUT: x})[0][:, 0]
    worst = float(np.abs(got - model.predict(x)).max())
    log_step("parity", f"ONNX Runtime vs scikit-learn on all {len(x)} rows: max |diff| {worst:.2e}")
    if worst > PARITY_TOLERANCE:
        raise BuildError(f"ONNX output differs from scikit-learn by {worst:.2e} (> {PARITY_TOLERANCE})")
    config = {
        "name": NAME, "version": version, "platform": "onnxruntime_onnx", "artifact": "model.onnx",
        "inputs": [{"name": INPUT, "datatype": "FP32", "shape": [-1, len(FEATURES)]}],
        "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, 1]}],
        "batching": {"max_batch_size": 64, "max_queue_delay_ms": 1.0, "max_queue_size": 1024, "latency_budget_ms": 40.0,
                     "preferred_batch_sizes": [8, 32, 64]},
        "runtime": {"intra_op_threads": 1, "inter_op_threads": 1},
        "warmup": {"batch_sizes": [1, 64], "iterations": 2},
        "parameters": {
            "description": "disease progression one year after baseline, from ten baseline measurements",
            "limits": {INPUT: limits(x)},
            "metrics": {"heldout_mae": round(mae, 2), "heldout_r2": round(r2, 4),
                        "mean_predictor_mae": round(baseline_mae, 2), "onnx_parity_max_abs": worst},
            "seed": seed, "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    }
    sample = {"features": FEATURES, "rows": [{"features": [float(v) for v in row], "progression": float(t)}
                                             for row, t in zip(x_test[:5], y_test[:5], strict=True)]}
    path = write_version(repository / NAME, version, {"model.onnx": onnx_bytes, "config.json": json_bytes(config),
                                                      "sample.json": json_bytes(sample)})
    log_step("done", f"wrote {path} (held-out R² {r2:.3f})")
    return path


def main(argv: list[str] | None = None) -> int:
    """Command line: build one version into the repository."""
    args = build_arg_parser("build.py", __doc__, seed=7).parse_args(argv)
    return run_build(lambda: build(args.repository, args.version, args.seed, args.force))


if __name__ == "__main__":
    sys.exit(main())
