"""LightningModules (diffusion policy, VLM) and the networks they use."""

import logging as _logging

# bitsandbytes (imported by peft, which diffusers' training utilities import) warns at import on
# CPUs with AVX512-BF16 that the optional `kernels` package is missing. Nothing here uses 4-bit
# unless `model.load_in_4bit` asks for it, and then bitsandbytes falls back to its own CPU kernel
# (measured: 4-bit loads and trains): the warning is not one a user can act on.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
