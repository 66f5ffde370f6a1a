"""Pure logic of the MLServer peer bench (bench/peer_mlserver.py): no MLServer or perf_analyzer here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.peer_mlserver import (
    LEVELS,
    MLSERVER_CANDIDATES,
    Level,
    MLServerSettings,
    model_config_message,
    model_settings,
    parse_perf_csv,
    perf_input_data,
    ratios,
    server_settings,
    summarize,
)

# What perf_analyzer 2.51 writes with -f at one level (latencies in µs), copied from a run against ours.
PERF_CSV = (
    "Concurrency,Inferences/Second,Client Send,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency\n"
    "8,696.347,5,2,10651,14159,17685,29378\n"
)
PERF_RATE_CSV = (
    "Request Rate,Inferences/Second,Client Send,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency\n"
    "300,299.251,9,2,1914,2331,2663,4967\n"
)



def test_parse_perf_csv_converts_microseconds_to_ms():
    assert parse_perf_csv(PERF_CSV) == pytest.approx({"rps": 696.347, "p50_ms": 10.651, "p90_ms": 14.159,
                                                      "p99_ms": 29.378})
    assert parse_perf_csv(PERF_RATE_CSV) == pytest.approx({"rps": 299.251, "p50_ms": 1.914, "p90_ms": 2.331,
                                                           "p99_ms": 4.967})


def test_parse_perf_csv_rejects_missing_rows_and_columns():
    with pytest.raises(ValueError, match="one result row"):
        parse_perf_csv(PERF_CSV.splitlines()[0] + "\n")
    with pytest.raises(ValueError, match="one result row"):
        parse_perf_csv(PERF_CSV + PERF_CSV.splitlines()[1] + "\n")
    with pytest.raises(ValueError, match="p99 latency"):
        parse_perf_csv(PERF_CSV.replace("p99 latency", "p98 latency"))


def test_model_settings_declare_io_and_batching():
    settings = model_settings(MLServerSettings(max_batch_size=64, max_batch_time_s=0.005), "/m/model.ubj")
    assert settings["implementation"] == "mlserver_xgboost.XGBoostModel"
    assert (settings["max_batch_size"], settings["max_batch_time"]) == (64, 0.005)
    assert settings["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 30]}]
    assert settings["outputs"] == [{"name": "predict_proba", "datatype": "FP32", "shape": [-1, 2]}]
    assert settings["parameters"]["uri"] == "/m/model.ubj"
    server = server_settings(MLServerSettings(parallel_workers=0), 1, 2, 3)
    assert (server["host"], server["http_port"], server["grpc_port"], server["metrics_port"]) == (
        "127.0.0.1", 1, 2, 3)
    assert server["parallel_workers"] == 0


def test_model_config_matches_model_settings():
    s = MLSERVER_CANDIDATES[0]
    config, settings = model_config_message(s), model_settings(s, "x")
    assert config["name"] == settings["name"] == "fraud"
    assert config["max_batch_size"] == s.max_batch_size > 0
    # Triton dims leave out the batch dimension that OIP shapes carry as -1.
    assert [(i["name"], i["dims"]) for i in config["input"]] == [
        (i["name"], [str(d) for d in i["shape"][1:]]) for i in settings["inputs"]]
    assert [(o["name"], o["dims"]) for o in config["output"]] == [
        (o["name"], [str(d) for d in o["shape"][1:]]) for o in settings["outputs"]]


def test_perf_input_data_uses_the_sample_rows(model_repository: Path):
    sample = json.loads((model_repository / "fraud" / "1" / "sample.json").read_text())
    data = perf_input_data(sample)["data"]
    assert len(data) == len(sample["rows"]) == 20
    assert data[3]["features"] == {"content": sample["rows"][3]["features"], "shape": [30]}


def test_levels_and_summaries():
    assert Level("concurrency", 8).perf_args() == ["--concurrency-range", "8:8"]
    assert Level("rate", 400).perf_args() == ["--request-rate-range", "400:400"]
    assert len({lv.label for lv in LEVELS}) == len(LEVELS)
    runs = [{"rps": 100.0, "p50_ms": 1.0, "p99_ms": 9.0}, {"rps": 300.0, "p50_ms": 3.0, "p99_ms": 2.0},
            {"rps": 200.0, "p50_ms": 2.0, "p99_ms": 4.0}]
    assert summarize(runs) == {"rps": 200.0, "p50_ms": 2.0, "p99_ms": 4.0}
    assert ratios({"rps": 300.0, "p50_ms": 1.0, "p99_ms": 6.0}, {"rps": 200.0, "p50_ms": 2.0, "p99_ms": 3.0}) == {
        "rps": 1.5, "p50_ms": 0.5, "p99_ms": 2.0}
