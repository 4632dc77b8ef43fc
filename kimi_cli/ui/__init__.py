"""The terminal front end: Rich rendering of a model turn (live panels or plain streams), the
`kimi chat` REPL with prompt-toolkit, slash commands and the status line. Never touches MLX."""
