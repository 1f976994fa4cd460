import torch

# Tests use tiny models: one thread avoids oversubscribing CI's 2 cores with thread handoffs.
torch.set_num_threads(1)
