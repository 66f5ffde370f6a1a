"""The model optimisation toolkit: one command exports, quantises, prunes and benchmarks a PyTorch model.

    python -m mlplatform.optimize --model cnn|sentiment [--quick] [--out build/optimize] [--install DIR]

A model takes part through a `Subject` (`mlplatform.optimize.subject`): its eager FP32 network,
held-out and training batches, a fine-tune loss and a structured-pruning rule; the service
provides it (`cnn_service.toolkit`, `sentiment_service.toolkit`). The toolkit makes every format
(`formats`), measures each one the same way (`measure`: size, held-out accuracy, agreement with
FP32, p50/p99 at batch 1 on one thread, rows/s at batch 8 and 32), recommends what to ship on
CPU, GPU and edge under an accuracy bound, and writes `report.md`, `report.json` and plots
(`report`) into `build/optimize/<model>/`. `install` turns the report into a model version's
runtime variants, which `mlplatform.variants` chooses from at load.

Submodules import torch and ONNX Runtime; this package's import is light (the model builds use
`mlplatform.optimize.quantize`).
"""
