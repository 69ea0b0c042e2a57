"""expandlm: small domain-specific Llama-style language models that learn new domains without forgetting.

The stages, one module each: domains → corpus → tokenizer → shards → model → train → evaluate → generate.
"""
__version__ = "0.1.0"
