"""The ahead-of-time compiler's shared parts: kernels, layouts and quantization, passes and the
pipeline, schedule rules, target resolution, tuning, and what every family build shares
(`compile`). Choosing a family is the registry's job (`edgert.families.registry.compile_model`).
"""

from edgert.compiler import tvmscript as _tvmscript  # noqa: F401  (installs the macro frame search)
