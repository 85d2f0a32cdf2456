"""host: everything inside one model actor. One model, in one precision, on its devices.

Holds the Host contract (protocol.py) and its configuration (config.py), the row runner every
host shares and the engine protocol it drives (runner.py, engine.py), the two engines
(transformers_host.py, vllm_host.py), decoding (decode.py, batch_decode.py), the metrics
registry, fidelity, per-layer measurements, and loading in a precision (precisions/, sources.py,
simulated quantization).
May import: catalog, planning, store (the row schema) and errors; torch, transformers, vLLM,
the quantization libraries. Never report, and never Ray Tune.
"""
