"""Build a Gemma 3 GGUF model: the decoder-only build of the Llama family with Gemma's config,
blocks and loader."""

from __future__ import annotations

from edgert.compiler.compile import BuildRequest, CompileResult


def build(req: BuildRequest) -> CompileResult:
    """Compile the Gemma 3 GGUF file ``req.source`` for ``req.target`` (options as the llama family's)."""
    from edgert.families.gemma3 import loader
    from edgert.families.gemma3.model import Gemma3Config, Gemma3ForCausalLM
    from edgert.families.llama.build import build_decoder

    return build_decoder(req, "gemma3", Gemma3Config, Gemma3ForCausalLM, loader)
