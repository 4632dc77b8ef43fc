"""`python -m kimi_cli.cli`: the `kimi` command without its console script.
Tests use it where the script is not installed.
"""

from . import main

main()
