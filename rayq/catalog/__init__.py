"""catalog: what rayq knows before anything runs. Names and facts only.

Holds the precision registry and the quantization scheme grammar, the engine registry and
what vLLM serves, the bundled models, GPU types and the paper's published tables.
May import: the standard library and rayq.errors, nothing else (tests/test_architecture.py):
every other layer reads the catalog, and validating a sweep file must stay well under a second.
"""
