"""`kimi serve`: the local model behind OpenAI- and Anthropic-shaped HTTP APIs.

Owns HTTP and the wire shapes only; generation is the engine's, parsing the chat parser's.
"""
