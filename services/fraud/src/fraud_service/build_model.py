"""Deterministic build of the fraud model: synthetic data -> XGBoost -> ONNX -> model repository.

Run as::

    python -m fraud_service.build_model --repository PATH [--version N] [--seed 42] [--rows 200000] [--force]

Steps: generate a seeded, imbalanced card-fraud data set (30 named numeric features, 1-2 % fraud,
label drawn from a latent logistic model plus noise), split it 70/15/15 stratified, train an
`xgboost.XGBClassifier`, evaluate it on the test split (decision threshold picked on validation for
the best F1), export it to ONNX, check ONNX Runtime against XGBoost, and write `model.onnx`,
`config.json` and `sample.json` into `<repository>/fraud/<version>/` atomically. The native XGBoost model
(`model.ubj`, `save_model`) goes beside them, so peers that serve XGBoost themselves (MLServer in
`bench/peer_mlserver.py`) load the very same trees; the platform serves the ONNX file.

The same seed gives the same data, model, metrics and ONNX bytes; only `built_at` changes. A version
built before `model.ubj` existed is rebuilt once (same ONNX bytes).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from mlplatform.build import (
    BuildError,
    build_arg_parser,
    json_bytes,
    log_step,
    reset_clock,
    run_build,
    write_version,
)

MODEL_NAME = "fraud"
INPUT_NAME = "features"
OUTPUT_NAMES = ("label", "probabilities")
ARTIFACT = "model.onnx"
NATIVE_ARTIFACT = "model.ubj"  # XGBoost's own format (UBJSON), for servers that run XGBoost natively
CONFIG_FILE = "config.json"
SAMPLE_FILE = "sample.json"
PARITY_TOLERANCE = 1e-4
TARGET_FRAUD_RATE = 0.015
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}
XGB_PARAMS: dict[str, Any] = {"n_estimators": 200, "max_depth": 6, "learning_rate": 0.1}
SAMPLE_ROWS = 20
SAMPLE_FRAUD_ROWS = 6

_MONEY = 1_000_000.0
_COUNT = 10_000.0
_KM = 20_000.0
_PCA = 100.0
N_PCA = 12

# (name, min, max, description) in model input order; the serving layer rejects values outside [min, max].
FEATURES: list[tuple[str, float, float, str]] = [
    ("amount", 0.0, _MONEY, "transaction amount in EUR"),
    ("hour_of_day", 0.0, 23.0, "local hour of the transaction (0-23)"),
    ("day_of_week", 0.0, 6.0, "day of week, 0 = Monday"),
    ("merchant_risk_score", 0.0, 1.0, "historical fraud risk of the merchant (0 = safe, 1 = risky)"),
    ("distance_from_home_km", 0.0, _KM, "distance between the transaction and the cardholder's home, km"),
    ("distance_from_last_txn_km", 0.0, _KM, "distance from the previous transaction of the card, km"),
    ("txn_count_1h", 0.0, _COUNT, "transactions of the card in the last hour"),
    ("txn_count_24h", 0.0, _COUNT, "transactions of the card in the last 24 hours"),
    ("avg_amount_30d", 0.0, _MONEY, "mean transaction amount of the card over 30 days, EUR"),
    ("amount_to_avg_ratio", 0.0, _COUNT, "amount / avg_amount_30d"),
    ("card_present", 0.0, 1.0, "1 if the physical card was present (chip or swipe)"),
    ("is_online", 0.0, 1.0, "1 for an e-commerce transaction"),
    ("is_foreign", 0.0, 1.0, "1 if the merchant is outside the card's home country"),
    ("new_device", 0.0, 1.0, "1 if the device / terminal was never seen for this card"),
    ("account_age_days", 0.0, 36_500.0, "age of the card account in days"),
    ("failed_logins_24h", 0.0, _COUNT, "failed online-banking logins in the last 24 hours"),
    ("chargebacks_1y", 0.0, _COUNT, "chargebacks on the card in the last year"),
    ("velocity_score", 0.0, 1.0, "spend-velocity score from the streaming feature store (0-1)"),
    *[(f"pca_{i:02d}", -_PCA, _PCA, f"anonymised behavioural component {i} (PCA)")
      for i in range(1, N_PCA + 1)],
]
FEATURE_NAMES: list[str] = [f[0] for f in FEATURES]
N_FEATURES = len(FEATURES)
assert N_FEATURES == 30, N_FEATURES

CONFIG_STATIC: dict[str, Any] = {
    "platform": "onnxruntime_onnx",
    "artifact": ARTIFACT,
    "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, N_FEATURES]}],
    "outputs": [
        {"name": "label", "datatype": "INT64", "shape": [-1]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]},
    ],
    # No added queue delay (Triton's default too): a row takes ~25 us, so waiting for batch-mates only adds
    # latency; under load, requests queued while a batch runs still form the next batch (BENCHMARKS.md).
    "batching": {"max_batch_size": 256, "max_queue_delay_ms": 0.0, "max_queue_size": 2048, "latency_budget_ms": 40.0,
                 "preferred_batch_sizes": [32, 64, 128, 256]},
    "runtime": {"intra_op_threads": 1, "inter_op_threads": 1},
    "warmup": {"batch_sizes": [1, 32, 256], "iterations": 2},
}

# Daytime-heavy hour profile (index = hour).
_HOUR_WEIGHTS = np.array([2, 1.5, 1, 1, 1, 1.5, 3, 5, 7, 8, 8, 9, 10, 9, 8, 8, 8, 9, 9, 8, 7, 6, 4, 3])



@dataclass(frozen=True)
class Split:
    """Train / validation / test arrays."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


# --------------------------------------------------------------------------- generate


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _intercept_for_rate(logit: np.ndarray, rate: float) -> float:
    """Intercept b such that mean(sigmoid(logit + b)) == rate (bisection, deterministic)."""
    lo, hi = -40.0, 40.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if _sigmoid(logit + mid).mean() < rate:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def generate_dataset(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic card transactions: float32 features [rows, 30] (FEATURES order), int64 labels (1 = fraud)."""
    rng = np.random.default_rng(seed)
    n = rows
    u = rng.random

    is_online = u(n) < 0.35
    card_present = ~is_online & (u(n) < 0.97)
    is_foreign = u(n) < 0.06
    new_device = u(n) < np.where(is_online, 0.10, 0.03)
    hour = rng.choice(24, size=n, p=_HOUR_WEIGHTS / _HOUR_WEIGHTS.sum()).astype(np.float64)
    day = rng.integers(0, 7, size=n).astype(np.float64)
    account_age = np.floor(rng.gamma(1.5, 700.0, size=n))
    avg_amount = np.round(np.maximum(rng.lognormal(3.9, 0.7, size=n), 1.0), 2)
    spike = np.where(u(n) < 0.03, np.exp(rng.uniform(1.0, 3.5, size=n)), 1.0)
    amount = np.round(np.maximum(avg_amount * rng.lognormal(0.0, 0.55, size=n) * spike, 0.01), 2)
    ratio = amount / avg_amount
    merchant_risk = rng.beta(2.0, 8.0, size=n)
    dist_home = np.where(is_foreign, rng.lognormal(6.5, 0.8, size=n), rng.lognormal(1.5, 1.2, size=n))
    dist_last = 0.3 * dist_home * u(n) + rng.lognormal(1.0, 1.5, size=n)
    burst = u(n) < 0.03
    txn_1h = rng.poisson(np.where(burst, 5.0, 0.3)).astype(np.float64)
    txn_24h = txn_1h + rng.poisson(3.0, size=n)
    failed_logins = (rng.poisson(0.05, size=n) + (u(n) < 0.01) * rng.poisson(4.0, size=n)).astype(np.float64)
    chargebacks = rng.poisson(0.05, size=n).astype(np.float64)
    velocity = 1.0 - np.exp(-(txn_1h / 4.0 + txn_24h / 40.0))
    velocity = np.clip(velocity + rng.normal(0.0, 0.05, size=n), 0.0, 1.0)
    pca = rng.normal(0.0, 1.0, size=(n, N_PCA)) * (2.0 * 0.85 ** np.arange(N_PCA))
    pca[:, 1] += 0.4 * (np.log(amount) - 3.9)  # some components carry a bit of the observed features
    pca[:, 3] += 0.5 * (hour - 12.0) / 6.0

    # Latent logistic model (plus unobserved noise) over a handful of features.
    logit = (
        1.0 * np.clip(np.log(ratio), -2.0, None)
        + 3.0 * merchant_risk
        + 0.8 * is_foreign + 0.7 * new_device + 2.0 * (is_foreign & new_device)
        + 0.6 * np.minimum(failed_logins, 6.0)
        + 0.25 * np.log1p(dist_home)
        + 0.8 * ((hour <= 5) | (hour >= 23))
        + 1.5 * velocity
        - 0.6 * card_present
        + 1.0 * (account_age < 30)
        + 0.5 * np.minimum(chargebacks, 4.0)
        + 0.5 * pca[:, 0] - 0.4 * pca[:, 2] + 0.4 * pca[:, 4]
        + rng.normal(0.0, 1.0, size=n)
    )
    logit += _intercept_for_rate(logit, TARGET_FRAUD_RATE)
    y = (u(n) < _sigmoid(logit)).astype(np.int64)
    # Class-conditional shifts, like V14 / V17 of the public credit-card data set.
    pca[:, 6] -= 1.6 * y * (0.5 + u(n))
    pca[:, 8] += 1.0 * y * u(n)

    columns = [amount, hour, day, merchant_risk, dist_home, dist_last, txn_1h, txn_24h, avg_amount, ratio,
               card_present, is_online, is_foreign, new_device, account_age, failed_logins, chargebacks,
               velocity, *pca.T]
    x = np.column_stack([np.asarray(c, dtype=np.float64) for c in columns])
    lo = np.array([f[1] for f in FEATURES])
    hi = np.array([f[2] for f in FEATURES])
    x = np.clip(x, lo, hi).astype(np.float32)
    if not ((x >= lo).all() and (x <= hi).all() and np.isfinite(x).all()):
        raise BuildError("generated features fall outside their declared ranges")
    return x, y


# --------------------------------------------------------------------------- split / train / evaluate


def split(x: np.ndarray, y: np.ndarray, seed: int) -> Split:
    """Stratified 70/15/15 split."""
    from sklearn.model_selection import train_test_split

    x_train, x_rest, y_train, y_rest = train_test_split(x, y, test_size=0.30, stratify=y, random_state=seed)
    x_val, x_test, y_val, y_test = train_test_split(x_rest, y_rest, test_size=0.50, stratify=y_rest,
                                                    random_state=seed)
    return Split(x_train, y_train, x_val, y_val, x_test, y_test)


def train(data: Split, seed: int) -> Any:
    """Fit the XGBClassifier (validation split monitored, no early stopping: all trees are exported)."""
    from xgboost import XGBClassifier

    # No scale_pos_weight: it would inflate the probabilities; the threshold is tuned instead.
    model = XGBClassifier(**XGB_PARAMS, tree_method="hist", n_jobs=2, random_state=seed,
                          objective="binary:logistic", eval_metric="aucpr")
    model.fit(data.x_train, data.y_train, eval_set=[(data.x_val, data.y_val)], verbose=False)
    history = model.evals_result()["validation_0"]["aucpr"]
    log_step("training", f"{len(history)} trees, validation PR-AUC first/best/last "
                     f"{history[0]:.4f}/{max(history):.4f}/{history[-1]:.4f}")
    return model


def choose_threshold(y: np.ndarray, proba: np.ndarray) -> float:
    """Probability cut-off with the best F1 on (validation) labels."""
    from sklearn.metrics import precision_recall_curve

    precision, recall, thresholds = precision_recall_curve(y, proba)
    f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
    return float(thresholds[int(np.argmax(f1))])


def evaluate(model: Any, data: Split) -> tuple[float, dict[str, float]]:
    """Threshold (from validation) and test-split metrics."""
    from sklearn.metrics import average_precision_score, precision_score, recall_score, roc_auc_score

    threshold = choose_threshold(data.y_val, model.predict_proba(data.x_val)[:, 1])
    proba = model.predict_proba(data.x_test)[:, 1]
    predicted = (proba >= threshold).astype(np.int64)
    metrics = {
        "roc_auc": round(float(roc_auc_score(data.y_test, proba)), 6),
        "pr_auc": round(float(average_precision_score(data.y_test, proba)), 6),
        "precision_at_threshold": round(float(precision_score(data.y_test, predicted, zero_division=0)), 6),
        "recall_at_threshold": round(float(recall_score(data.y_test, predicted)), 6),
    }
    return _f32(threshold), metrics


# --------------------------------------------------------------------------- export / verify


def _register_xgboost_converter() -> None:
    from onnxmltools.convert.xgboost.operator_converters.XGBoost import convert_xgboost
    from skl2onnx import update_registered_converter
    from skl2onnx.common.shape_calculator import calculate_linear_classifier_output_shapes
    from xgboost import XGBClassifier

    update_registered_converter(
        XGBClassifier, "XGBoostXGBClassifier", calculate_linear_classifier_output_shapes, convert_xgboost,
        options={"nocl": [True, False], "zipmap": [True, False, "columns"]},
    )


def export(model: Any, seed: int) -> bytes:
    """ONNX bytes: input `features` float[N, 30]; outputs `label` int64[N], `probabilities` float[N, 2]."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    _register_xgboost_converter()
    onx = convert_sklearn(
        model, name=MODEL_NAME,
        initial_types=[(INPUT_NAME, FloatTensorType([None, N_FEATURES]))],
        options={id(model): {"zipmap": False}},
        target_opset=TARGET_OPSET,
    )
    inputs = [i.name for i in onx.graph.input]
    outputs = tuple(o.name for o in onx.graph.output)
    if inputs != [INPUT_NAME] or outputs != OUTPUT_NAMES:
        raise BuildError(f"unexpected ONNX signature: inputs {inputs}, outputs {list(outputs)}")
    onx.doc_string = f"fraud XGBClassifier, seed {seed}"
    return onx.SerializeToString()


def run_onnx(onnx_bytes: bytes, x: np.ndarray) -> dict[str, np.ndarray]:
    """All outputs of the ONNX model on `x` (CPU, single thread)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    session = ort.InferenceSession(onnx_bytes, sess_options=so, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {INPUT_NAME: x.astype(np.float32)}), strict=True))


def verify(onnx_bytes: bytes, model: Any, x: np.ndarray) -> tuple[float, np.ndarray]:
    """Max |ONNX - XGBoost| fraud probability on `x`, and ONNX's probabilities; BuildError above tolerance."""
    out = run_onnx(onnx_bytes, x)
    proba = out["probabilities"]
    if out["label"].shape != (len(x),) or out["label"].dtype != np.int64 or proba.shape != (len(x), 2):
        raise BuildError(f"ONNX outputs have unexpected shapes: label {out['label'].shape} "
                         f"{out['label'].dtype}, probabilities {proba.shape}")
    expected = model.predict_proba(x.astype(np.float32))[:, 1]
    diff = float(np.max(np.abs(proba[:, 1].astype(np.float64) - expected.astype(np.float64))))
    if not diff <= PARITY_TOLERANCE:
        raise BuildError(f"ONNX/XGBoost parity failed: max abs diff {diff:.3g} > {PARITY_TOLERANCE:g}")
    return diff, proba[:, 1]


# --------------------------------------------------------------------------- write


def _f32(value: float) -> float:
    """Shortest decimal that round-trips to the same float32 (keeps JSON readable and exact)."""
    return float(str(np.float32(value)))


def native_bytes(model: Any) -> bytes:
    """The booster in XGBoost's UBJSON format (what `XGBClassifier.load_model` / MLServer's runtime read)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / NATIVE_ARTIFACT
        model.save_model(path)
        return path.read_bytes()


def make_config(
    version: int, threshold: float, metrics: dict[str, Any], seed: int, rows: int
) -> dict[str, Any]:
    """The version's config.json content (validated by mlplatform.repository.ModelConfig when served)."""
    import xgboost

    return {
        "name": MODEL_NAME,
        "version": version,
        **CONFIG_STATIC,
        "parameters": {
            "threshold": threshold,
            "features": [{"name": n, "min": lo, "max": hi, "description": d} for n, lo, hi, d in FEATURES],
            "metrics": metrics,
            "training": {
                "seed": seed, "rows": rows, **XGB_PARAMS, "xgboost_version": xgboost.__version__,
                "built_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            },
        },
    }


def make_sample(
    x: np.ndarray, y: np.ndarray, proba: np.ndarray, threshold: float, version: int
) -> dict[str, Any]:
    """SAMPLE_ROWS test rows (SAMPLE_FRAUD_ROWS of them fraud) with the model's expected probability."""
    fraud = np.flatnonzero(y == 1)[:SAMPLE_FRAUD_ROWS]
    legit = np.flatnonzero(y == 0)[:SAMPLE_ROWS - len(fraud)]
    if len(fraud) < 5 or len(fraud) + len(legit) < SAMPLE_ROWS:
        raise BuildError(f"test split too small for {SAMPLE_ROWS} sample rows with >=5 fraud; raise --rows")
    rows = [
        {"features": [_f32(v) for v in x[i]], "label": int(y[i]), "expected_probability": _f32(proba[i])}
        for i in np.sort(np.concatenate([fraud, legit]))
    ]
    return {
        "model": MODEL_NAME, "version": version, "input": INPUT_NAME, "feature_names": FEATURE_NAMES,
        "threshold": threshold, "tolerance": PARITY_TOLERANCE, "rows": rows,
    }


# --------------------------------------------------------------------------- entry points


def build(
    repository: Path, version: int = 1, seed: int = 42, rows: int = 200_000, force: bool = False
) -> Path:
    """Build `<repository>/fraud/<version>/` (kept as is when complete, unless `force`); return it."""
    if version < 1:
        raise ValueError(f"version must be >= 1, got {version}")
    reset_clock()
    target = Path(repository) / MODEL_NAME / str(version)
    if not force and all((target / f).is_file() for f in (ARTIFACT, NATIVE_ARTIFACT, CONFIG_FILE)):
        log_step("skip", f"{target} is up to date (use --force to rebuild)")
        return target

    log_step("generating", f"{rows} rows, seed {seed}")
    x, y = generate_dataset(rows, seed)
    log_step("generating", f"fraud rate {y.mean():.4%} ({int(y.sum())} of {rows})")
    if not 0.01 <= y.mean() <= 0.02:
        log_step("generating", "WARNING: fraud rate outside the intended 1-2 % (too few rows?)")
    data = split(x, y, seed)
    log_step("generating", f"split train/val/test {len(data.y_train)}/{len(data.y_val)}/{len(data.y_test)}")

    log_step("training", f"XGBClassifier {XGB_PARAMS}")
    model = train(data, seed)

    log_step("evaluating", "threshold on validation (max F1), metrics on test")
    threshold, metrics = evaluate(model, data)
    metrics["fraud_rate"] = round(float(y.mean()), 6)
    log_step("evaluating", f"ROC-AUC {metrics['roc_auc']:.4f}  PR-AUC {metrics['pr_auc']:.4f}  "
                       f"threshold {threshold:.4f}  precision {metrics['precision_at_threshold']:.4f}  "
                       f"recall {metrics['recall_at_threshold']:.4f}")

    log_step("exporting", f"ONNX opset {TARGET_OPSET}")
    onnx_bytes = export(model, seed)
    log_step("exporting", f"{len(onnx_bytes)} bytes")

    log_step("verifying", f"onnxruntime vs xgboost on {len(data.y_test)} test rows")
    diff, onnx_proba = verify(onnx_bytes, model, data.x_test)
    metrics["parity_max_abs_diff"] = diff
    metrics["test_rows"] = len(data.y_test)
    log_step("verifying", f"max abs diff {diff:.3g} (tolerance {PARITY_TOLERANCE:g})")

    config = make_config(version, threshold, metrics, seed, rows)
    sample = make_sample(data.x_test, data.y_test, onnx_proba, threshold, version)
    log_step("writing", f"{ARTIFACT}, {NATIVE_ARTIFACT}, {CONFIG_FILE}, {SAMPLE_FILE} -> {target} (atomic rename)")
    target = write_version(Path(repository) / MODEL_NAME, version, {
        ARTIFACT: onnx_bytes, NATIVE_ARTIFACT: native_bytes(model), CONFIG_FILE: json_bytes(config),
        SAMPLE_FILE: json_bytes(sample),
    })
    log_step("writing", f"{target}: {', '.join(sorted(p.name for p in target.iterdir()))}")
    return target


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; exit status 0 on success, 1 on a failed build."""
    parser = build_arg_parser("python -m fraud_service.build_model", __doc__, seed=42)
    parser.add_argument("--rows", type=int, default=200_000, help="rows to generate (default 200000)")
    args = parser.parse_args(argv)
    if args.rows < 1_000:
        parser.error("--rows must be >= 1000")
    return run_build(lambda: build(args.repository, version=args.version, seed=args.seed, rows=args.rows,
                                   force=args.force))

if __name__ == "__main__":
    sys.exit(main())
