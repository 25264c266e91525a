try:
    import torch

    # CI has 2 cores; more intra-op threads than that only adds contention with XLA.
    torch.set_num_threads(2)
except ImportError:
    pass
