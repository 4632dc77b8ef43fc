"""Several machines: the model pipelined over `mx.distributed` (mlx.launch, ring or JACCL).

Rank 0 drives (tokenizer, sampling, UI); the other ranks run their block of layers and follow.
"""
