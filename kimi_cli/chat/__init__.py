"""Chat formatting for Kimi-K2-Thinking: prompt template, and parsing of what the model emits.

`template` turns messages into the prompt string; `parser` turns generated ids into events.
"""
