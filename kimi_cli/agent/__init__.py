"""Agent runs: the model thinks and calls tools (tools/) for hundreds of steps, under an approval
policy (approval.py), the hard-deny rules (safety.py) and a sandbox for commands (sandbox.py).

The loop is `loop.Agent`; `frontend.py` is `kimi run --agent`. Importing this package is cheap
(no MLX): import the modules you need.
"""
