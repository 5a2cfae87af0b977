"""Process setup for torch work: where it runs (CUDA when present, else the CPU, with OpenMP threads that sleep
while they wait), whether bfloat16 is native there, and quiet library logging."""

from __future__ import annotations

import os
import sys

#: What `configure_threads` sets for each kind of process, unless the environment already says how OpenMP waits.
THREAD_ENV = {
    "one-question": {"OMP_WAIT_POLICY": "PASSIVE"},
    "serve": {"GOMP_SPINCOUNT": "20000"},
}
#: Variables with which the user decides how OpenMP threads wait (then `configure_threads` sets nothing).
_WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def configure_threads(use: str = "one-question") -> list[str]:
    """Set how idle OpenMP threads wait, before torch or Faiss loads OpenMP.

    "one-question" (`search`, `ask`, `chat`, `evaluate-answers`, `evaluate-conversations`): they sleep at once
    (`OMP_WAIT_POLICY=PASSIVE`). Torch's CPU wheel and Faiss each load GNU OpenMP, whose pool threads spin for a while
    after every parallel region before they sleep. With the pool as large as the machine (the default) and another
    process busy, every region waits for a thread the scheduler has given the busy process's core: 35 tokens
    generated on the thread that loaded the model took 2.2-2.5x as long beside one busy process on 2 cores
    (`bench/threads.py`); sleeping threads keep that at 1.2x.

    "serve": they spin briefly, then sleep (`GOMP_SPINCOUNT=20000`, tens of microseconds). A server owns its machine,
    and a decoding step is ~200 parallel regions a few tens of microseconds apart: spinning across those gaps is
    what makes it fast, but threads that spin *forever* (`OMP_WAIT_POLICY=ACTIVE`) took cores from the generating
    thread, since every thread that runs torch work (the loader, the web framework's worker threads encoding
    questions, the batcher) keeps an OpenMP team of its own. `bench/serve.py`, one client / eight: 20.7 / 71.1
    tokens/s with the brief spin, 16.0 / 59.3 spinning forever, 14.1 / 51.4 sleeping at once.

    Training and batch encoding keep the library default (5-20 % faster with spinning threads on an idle machine).
    libgomp reads the variables once, when it is loaded: the CLI calls this first; `QueryEngine.load` and `Generator`
    call it too.

    Returns:
        The variables set here: none when the environment sets one of them already (the user's choice stands) or
        when torch or Faiss is loaded (too late to take effect).
    """
    if "torch" in sys.modules or "faiss" in sys.modules:
        return []
    if any(name in os.environ for name in _WAIT_VARIABLES):
        return []
    wanted = THREAD_ENV[use]
    for name, value in wanted.items():
        os.environ[name] = value
    return list(wanted)


def quiet_transformers() -> None:
    """Silence weight-loading bars and 'newly initialised' chatter; our own progress bars stay."""
    import warnings

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for module in ("transformers", "peft", "trl", "sentence_transformers"):  # deprecation notices meant for their devs
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)


def gpu_possible() -> bool:
    """Whether torch may find a CUDA GPU, without importing torch (1-2 s): its own answer when it is loaded already,
    else whether an NVIDIA driver is."""
    if "torch" in sys.modules:
        return bool(sys.modules["torch"].cuda.is_available())
    return os.path.exists("/proc/driver/nvidia/version")


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
