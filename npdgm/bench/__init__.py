"""``npdgm bench``: full training steps of the same models on npdgm-NumPy, npdgm-CuPy and PyTorch, beside the
GEMM floor of the step's own matmul shapes measured in the same run.

    run           the command: plan, isolated points, tables, JSON / markdown / sweep plot
    workloads     vae, nice, realnvp2d: identical data, models and Adam on every backend
    harness       timing blocks, thread pinning, peak memory, machine facts
    gemm          the GEMM floor
    npdgm_models  the library models a step trains; torch_models: their eager PyTorch peers
    profile       where one npdgm step spends its time

Imports nothing heavy at package level (NumPy, torch and CuPy load inside the functions that use them).
"""
