"""Process setup for torch work: where it runs (CUDA when present, else the CPU, with OpenMP threads that sleep
while they wait), whether bfloat16 is native there, and quiet library logging."""

from __future__ import annotations

import os
import sys

#: What `configure_threads` sets unless the environment already says otherwise.
THREAD_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def configure_threads(wait_policy: str = "PASSIVE") -> list[str]:
    """Let idle OpenMP threads sleep instead of spin, for commands that answer one question at a time.

    `serve` asks for "ACTIVE" instead: a server owns its machine, and its encoder and batcher threads hand work
    back and forth; with spinning threads one client got 12.7 instead of 11.5 tokens/s and eight 28.3 instead of
    23.5 (`bench/serve.py`, idle machine).

    Torch's CPU wheel and Faiss each load GNU OpenMP, whose pool threads spin for a while after every parallel
    region before they sleep. With the pool as large as the machine (the default) and another process busy, every
    region waits for a thread the scheduler has given the busy process's core: 35 tokens generated on the thread
    that loaded the model took 2.2-2.5x as long beside one busy process on 2 cores (`bench/threads.py`). Generation
    in a thread of its own (`QueryEngine.stream`/`ask`, the batcher) escapes only by accident: the extra OpenMP team
    makes libgomp count more threads than cores, and then it spins briefly. `OMP_WAIT_POLICY=PASSIVE` removes the
    spinning on every path. Training and batch encoding keep the default: with spinning threads they run 5-20 %
    faster on an idle machine (and about 2x slower beside a busy process).

    libgomp reads the variable once, when it is loaded, so this must run before torch or Faiss is imported: the CLI
    calls it first in `search`, `ask`, `chat`, `serve`, `evaluate-answers` and `evaluate-conversations`;
    `QueryEngine.load` and `Generator` call it too.

    Returns:
        The variables set here: none when the environment sets them already (the user's choice stands) or when
        torch or Faiss is loaded (too late to take effect).
    """
    if "torch" in sys.modules or "faiss" in sys.modules:
        return []
    wanted = {**THREAD_ENV, "OMP_WAIT_POLICY": wait_policy}
    applied = [name for name in wanted if name not in os.environ]
    for name in applied:
        os.environ[name] = wanted[name]
    return applied


def quiet_transformers() -> None:
    """Silence weight-loading bars and 'newly initialised' chatter; our own progress bars stay."""
    import warnings

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for module in ("transformers", "peft", "trl", "sentence_transformers"):  # deprecation notices meant for their devs
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)


def torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def native_bf16(device: str | None = None) -> bool:
    """True where bfloat16 matmuls run natively on `device` (default: where torch work runs): a CUDA GPU with
    bf16, or a CPU with AVX512-BF16 or AMX."""
    import torch

    if (device or torch_device()).startswith("cuda"):
        return bool(torch.cuda.is_bf16_supported())
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)
